"""Quality of bf16 autocast against fp32 on each chapter's real training recipe (issue 17.3): same data, same seeds.

`bench/profile_cost.py --precisions no bf16` measures the speed of bf16 autocast; this script measures what it costs
in quality, before any chapter adopts it. For each chapter the recipe trains with fp32 and with bf16 for the same
seeds (the spread between fp32 seeds is the noise a precision change must stay within), then each model is measured
the way its chapter measures it:

- 05 / 06 (pixel DDPMs): the chapter's judge reads class-conditional DDIM samples (the chapter's steps and η, w = 3,
  the same x_T for every model), and the EMA model's loss on a fixed batch of test images (same t and noise);
- 11 (clothing judge): held-out accuracy of types, colours and patterns on the same split.

Verdict per chapter and measure: bf16 is "within noise" when the mean bf16 − fp32 difference (paired by seed) is no
larger than the fp32 seed-to-seed spread plus two binomial standard errors. Training is fp32 or bf16; every
evaluation runs in fp32.

    python bench/precision_quality.py --chapters 05,06,11                  # cpu profile, seeds 0 and 1
    python bench/precision_quality.py --chapters 05 --profile smoke --seeds 0 --samples 20 --out-dir /tmp/b   # runs?

Writes bench/results/precision_quality_<profile>_<device>.json and .md.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import add_machine_arguments, describe, out_dir, setup, write_result  # noqa: E402

from ldm_course.core import make_generator, resolve_profile  # noqa: E402
from ldm_course.data import load_cifar10, load_mnist, to_tensors  # noqa: E402
from ldm_course.fashion import load_fashion  # noqa: E402
from ldm_course.ddpm import (  # noqa: E402
    DDPM_CHAPTERS, build_loss, build_scheduler, classifier_accuracy, ddpm_training_data, sample_images, train_classifier,
    train_ddpm,
)

GUIDANCE = 3.0   # the w the chapters' sample figures use
TEST_LOADERS = {"mnist": load_mnist, "cifar10": load_cifar10}


def binomial_se(p: float, n: int) -> float: return math.sqrt(max(p * (1 - p), 1e-12) / max(n, 1))


def ddpm_chapter(chapter: str, profile: str, seeds: list[int], samples_per_class: int, device: str) -> dict:
    "Train chapter 05's or 06's DDPM in fp32 and bf16 per seed; judge accuracy of samples and a fixed-batch loss."
    dataset = DDPM_CHAPTERS[chapter]
    cfg, images, labels, source = ddpm_training_data(dataset, profile, 0, "auto")
    test_set, _ = TEST_LOADERS[dataset](train=False, source=source.source, profile=profile, verbose=False, download=False)
    test_images, test_labels = to_tensors(test_set, limit=512)
    judge, _ = train_classifier(images, labels, cfg.judge, cfg.judge_train, device=device)   # fp32, once, for every model
    eval_labels = torch.arange(cfg.num_classes).repeat(samples_per_class)
    rows = []
    for seed in seeds:
        for precision in ("no", "bf16"):
            run_cfg = cfg.replace(train=cfg.train.replace(seed=seed, mixed_precision=precision))
            start = time.perf_counter()
            run = train_ddpm(run_cfg, images, labels, chapter, source.source, profile, checkpoints=False, device=device)
            seconds = time.perf_counter() - start
            model = run.trainer.ema_model.eval().float()
            samples = sample_images(model, build_scheduler(cfg), cfg.image_shape, class_labels=eval_labels,
                                    guidance_scale=GUIDANCE, null_class=cfg.null_class, num_inference_steps=cfg.ddim_steps,
                                    eta=cfg.ddim_eta, clip_sample=cfg.clip_sample, generator=make_generator(1234))
            at = next(model.parameters()).device
            with torch.no_grad():   # L_simple on fixed test images, t and noise, no label dropout
                batch = (test_images.to(at), test_labels.to(at))
                loss = float(build_loss(cfg.replace(cond_drop_prob=0.0))(model, batch, make_generator(99)))
            accuracy = classifier_accuracy(judge, samples, eval_labels)
            rows.append({"seed": seed, "precision": precision, "train_seconds": round(seconds, 1),
                         "judge_accuracy": accuracy, "judge_accuracy_se": binomial_se(accuracy, len(eval_labels)),
                         "test_loss": loss, "train_loss_last_20": float(statistics.fmean(run.history.loss[-20:]))})
            print(f"{chapter} seed {seed} {precision:>4}: {seconds:.0f} s, judge {accuracy:.3f}, test loss {loss:.4f}", flush=True)
    return {"chapter": chapter, "num_samples": len(eval_labels), "guidance": GUIDANCE, "steps": cfg.ddim_steps,
            "data_source": source.source, "rows": rows, "measures": ("judge_accuracy", "test_loss")}


def judge_chapter(profile: str, seeds: list[int], device: str) -> dict:
    "Train chapter 11's clothing judge in fp32 and bf16 per seed on the notebook's split; held-out accuracies."
    from ldm_course.judge import garment_accuracy, judge_inputs, train_garment_judge
    from ldm_course.metrics import eval_config, judge_pattern_labels
    ecfg = eval_config(profile)
    catalogue, source = load_fashion(profile=profile, require=("articleType", "baseColour"), verbose=False)
    types, type_names = catalogue.labels("articleType")
    colours, colour_names = catalogue.labels("baseColour")
    patterns, pattern_names = judge_pattern_labels(catalogue.records, source.source)
    order = torch.randperm(len(catalogue), generator=make_generator(0))
    n_heldout = max(int(len(order) * ecfg.heldout_fraction), 20)
    heldout, train = order[:n_heldout], order[n_heldout:]
    config = ecfg.garment_judge_config(type_names, colour_names, pattern_names)
    inputs = judge_inputs(config, catalogue)   # decoded once: the same inputs for every run
    pick = lambda x, idx: type(x)(*(None if t is None else t[idx] for t in x))
    rows = []
    for seed in seeds:
        for precision in ("no", "bf16"):
            start = time.perf_counter()
            judge, _ = train_garment_judge(pick(inputs, train), types[train], colours[train], config,
                                           ecfg.judge_train.replace(seed=seed, mixed_precision=precision),
                                           pattern_labels=patterns[train], device=device)
            seconds = time.perf_counter() - start
            acc = garment_accuracy(judge.float(), pick(inputs, heldout), types[heldout], colours[heldout], patterns[heldout])
            row = {"seed": seed, "precision": precision, "train_seconds": round(seconds, 1)}
            for head in ("type", "colour", "pattern"):
                row[f"{head}_accuracy"], row[f"{head}_accuracy_se"] = acc[head], binomial_se(acc[head], n_heldout)
            rows.append(row)
            print(f"11 judge seed {seed} {precision:>4}: {seconds:.0f} s, type {acc['type']:.3f}, colour {acc['colour']:.3f}, "
                  f"pattern {acc['pattern']:.3f}", flush=True)
    return {"chapter": "11_evaluation", "num_heldout": n_heldout, "data_source": source.source, "rows": rows,
            "measures": ("type_accuracy", "colour_accuracy", "pattern_accuracy")}


def verdicts(result: dict) -> list[dict]:
    "Per measure: fp32 mean, bf16 mean, paired difference, fp32 seed spread, standard error, within noise or not."
    rows, out = result["rows"], []
    by = {(r["seed"], r["precision"]): r for r in rows}
    seeds = sorted({r["seed"] for r in rows})
    for measure in result["measures"]:
        fp32 = [by[s, "no"][measure] for s in seeds]
        bf16 = [by[s, "bf16"][measure] for s in seeds]
        diff = statistics.fmean(b - f for b, f in zip(bf16, fp32))
        spread = max(fp32) - min(fp32) if len(fp32) > 1 else 0.0
        # a binomial standard error for accuracies; a loss on fixed draws has none besides the seed spread
        se = statistics.fmean(by[s, "no"].get(f"{measure}_se", 0.0) for s in seeds)
        out.append({"measure": measure, "fp32": statistics.fmean(fp32), "bf16": statistics.fmean(bf16), "difference": diff,
                    "fp32_seed_spread": spread, "standard_error": se,
                    "within_noise": abs(diff) <= spread + 2 * se * math.sqrt(2)})
    return out


def markdown(results: list[dict], meta: dict, info: dict) -> str:
    lines = [f"# bf16 autocast against fp32: quality ({meta['profile']} profile)", "", describe(info), "",
             f"Seeds {meta['seeds']}; training in the precision shown, every evaluation in fp32. Within noise: "
             "|bf16 − fp32| ≤ fp32 seed spread + 2·√2 standard errors.", "",
             "| chapter | measure | fp32 | bf16 | bf16 − fp32 | fp32 seed spread | SE | within noise | train s fp32 / bf16 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        times = {p: statistics.fmean(x["train_seconds"] for x in r["rows"] if x["precision"] == p) for p in ("no", "bf16")}
        for v in r["verdicts"]:
            lines.append(f"| {r['chapter']} | {v['measure']} | {v['fp32']:.4f} | {v['bf16']:.4f} | {v['difference']:+.4f} | "
                         f"{v['fp32_seed_spread']:.4f} | {v['standard_error']:.4f} | {'yes' if v['within_noise'] else '**no**'} | "
                         f"{times['no']:.0f} / {times['bf16']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--chapters", default="05,06,11", help="comma-separated among 05, 06, 11")
    p.add_argument("--seeds", default="0,1", help="training seeds, each trained in fp32 and in bf16")
    p.add_argument("--samples", type=int, default=50, help="samples per class for the DDPM chapters' judge accuracy")
    add_machine_arguments(p, profile_help="run profile whose recipes are trained (default: cpu, or gpu on CUDA)")
    args = p.parse_args(argv)
    device, profile, info = setup(args)
    profile = resolve_profile(profile)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    chapters = [c.strip() for c in args.chapters.split(",") if c.strip()]
    unknown = [c for c in chapters if c not in ("05", "06", "11")]
    if unknown: p.error(f"unknown chapters {unknown}; expected among 05, 06, 11")
    meta = {"profile": profile, "seeds": seeds, "device": device.type, "threads": torch.get_num_threads(),
            "command": " ".join(["bench/precision_quality.py", *(sys.argv[1:] if argv is None else argv)])}
    results = []
    for c in chapters:
        if c == "11": r = judge_chapter(profile, seeds, str(device))
        else: r = ddpm_chapter({"05": "05_ddpm_mnist", "06": "06_ddpm_cifar10"}[c], profile, seeds, args.samples, str(device))
        r["verdicts"] = verdicts(r)
        results.append(r)   # written after each chapter: a stopped run keeps what it measured
        write_result(f"precision_quality_{profile}_{device.type}", {"meta": meta, "machine": info, "results": results},
                     markdown(results, meta, info), out_dir(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
