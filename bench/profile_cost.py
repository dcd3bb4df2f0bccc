"""Training cost of a run profile: seconds per optimizer step of each chapter's real recipe × its max_steps.

Every training run the notebooks do (05/06 DDPM and judge, 07 KL- and VQ-VAE, 09 additive and 10 cross-attention
latent U-Nets, 11 clothing judge) is built with the notebook's own objects: config presets, model builders, loss, and
chapter 04's Trainer with the recipe's TrainConfig unchanged (batch, grad_accum, bf16, EMA, DataLoader workers), except
that no checkpoint is written. The data are random tensors of the real shapes in the notebooks' Dataset types (a
step's cost does not depend on the values). `Trainer.fit(until_step=W + N)` runs W warm-up and N timed steps; each
step's wall time comes from the Trainer's history (it waits for the loss and gradient norm with .item(), so on a GPU
it is real time). Projected training time = median seconds per step × max_steps. Not counted: data preparation, JPEG
decoding (chapter 07 decodes the catalogue in its loader workers on the gpu profile), sampling, evaluation.

When runs/<profile>/ holds a notebook run made on the same kind of device, each row is set beside the training time
that notebook recorded (runs/<profile>/metrics/*.json), and each notebook beside its wall time
(runs/<profile>/pipeline.json: an upper bound, it also holds data preparation, sampling and evaluation).

    python bench/profile_cost.py                            # gpu profile on CUDA, else cpu
    python bench/profile_cost.py --profile cpu --warmup 2 --steps 5
    python bench/profile_cost.py --chapters 05,09_additive  # chapter numbers or row names
    python bench/profile_cost.py --profile smoke --device cpu --warmup 1 --steps 2 --out-dir /tmp/b   # check that it runs
    python bench/profile_cost.py --profile cpu --precisions no bf16 --rounds 2   # fp32 against bf16 autocast, interleaved

With --precisions, each recipe is timed once per precision and round, in alternating order (fp32, bf16, bf16, fp32...):
a machine slowed by other work slows both alike, and the ratio of the medians is the speed-up of bf16 autocast on
this device (CPUs with AVX512-BF16 or AMX run it natively; others emulate it, usually slower). Quality is not
measured here: a precision is adopted only where the chapters' measured results stay within their noise.

Writes bench/results/profile_cost_<profile>_<device>.json and .md.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import add_machine_arguments, describe, out_dir, setup, write_result  # noqa: E402

from ldm_course.core import PROFILES, repo_root, runs_dir, torch_seeded  # noqa: E402
from ldm_course.cross_attention import cross_attention_config  # noqa: E402
from ldm_course.data import GARMENT_COLOURS, GARMENT_TYPES  # noqa: E402
from ldm_course.ddpm import ClassificationLoss, build_classifier, build_loss, build_unet, ddpm_config  # noqa: E402
from ldm_course.ldm import CaptionedLatents, LDMConfig, build_ldm_loss, build_ldm_unet, ldm_config  # noqa: E402
from ldm_course.text import TextEmbeddings  # noqa: E402
from ldm_course.training import TrainConfig  # noqa: E402
from ldm_course.trainer import Trainer  # noqa: E402
from ldm_course.unet import count_parameters  # noqa: E402
from ldm_course.vae import build_vae, vae_config, vae_train_config  # noqa: E402
from ldm_course.vae_losses import VAELoss  # noqa: E402

TEXT_DIM = 384        # MiniLM, the offline text encoder: size of the pooled vector and of each token
DATASET_BATCHES = 4   # random items = 4 global batches: the sampler needs one, and epochs turn over as in training


class Recipe(NamedTuple):
    "One training run of a notebook: what its Trainer gets."
    model: nn.Module
    dataset: Dataset
    loss_fn: Callable[[nn.Module, Any], Tensor]
    train: TrainConfig


class Chapter(NamedTuple):
    "A training run to time, and where its notebook records the time it took."
    title: str                       # row label
    notebook: str                    # key of runs/<profile>/pipeline.json, name of its metrics file
    seconds_key: tuple[str, ...]     # path of the recorded training seconds in that metrics file
    steps_key: tuple[str, ...]       # path of the recorded number of steps
    build: Callable[[str, int], Recipe]  # (profile, caption tokens) -> recipe


def num_items(train: TrainConfig) -> int: return DATASET_BATCHES * train.batch_size * train.grad_accum


def random_images(n: int, shape: tuple[int, ...], g: torch.Generator) -> Tensor:
    return torch.rand((n, *shape), generator=g) * 2 - 1   # [-1, 1], as the loaders give


def ddpm_recipe(dataset: str, profile: str) -> Recipe:
    "Chapters 05/06: the class-conditional U-Net, L_simple with label dropout (the notebook's Trainer call)."
    cfg, g = ddpm_config(dataset, profile), torch.Generator().manual_seed(0)
    n = num_items(cfg.train)
    data = TensorDataset(random_images(n, cfg.image_shape, g), torch.randint(0, cfg.num_classes, (n,), generator=g))
    return Recipe(build_unet(cfg), data, build_loss(cfg), cfg.train)


def judge_recipe(dataset: str, profile: str) -> Recipe:
    "Chapters 05/06: the judge classifier, as `train_classifier` builds it."
    cfg, g = ddpm_config(dataset, profile), torch.Generator().manual_seed(0)
    n = num_items(cfg.judge_train)
    data = TensorDataset(random_images(n, cfg.image_shape, g), torch.randint(0, cfg.judge.num_classes, (n,), generator=g))
    with torch_seeded(cfg.judge_train.seed): model = build_classifier(cfg.judge)
    return Recipe(model, data, ClassificationLoss(), cfg.judge_train)


def vae_recipe(kind: str, profile: str) -> Recipe:
    "Chapter 07: an autoencoder with `VAELoss` (`train_autoencoder` in the notebook)."
    cfg, train = vae_config(kind, profile), vae_train_config(kind, profile)
    images = random_images(num_items(train), (3, cfg.image_size, cfg.image_size), torch.Generator().manual_seed(0))
    return Recipe(build_vae(cfg, train.seed), TensorDataset(images), VAELoss(cfg), train)


def random_embeddings(real_tokens: Tensor, length: int, g: torch.Generator) -> TextEmbeddings:
    "Shaped like the text encoder's output: unit pooled vectors, token vectors zero beyond each prompt's real tokens."
    mask = torch.arange(length) < real_tokens[:, None]
    tokens = torch.randn(len(real_tokens), length, TEXT_DIM, generator=g) * mask[..., None]
    return TextEmbeddings(F.normalize(torch.randn(len(real_tokens), TEXT_DIM, generator=g), dim=-1), tokens, mask)


def ldm_recipe(cfg: LDMConfig, profile: str, tokens: int) -> Recipe:
    "Chapters 09/10: scaled latents with two captions each (product name, short caption), loss as `train_ldm` builds it."
    n, g = num_items(cfg.train), torch.Generator().manual_seed(0)
    lengths = torch.randint(3, tokens + 1, (2 * n,), generator=g)
    lengths[0] = tokens   # caption_embeddings trims the table to its longest caption
    with_tokens = bool(cfg.unet.cross_attention_levels)
    data = CaptionedLatents(torch.randn(n, *vae_config("kl", profile).latent_shape, generator=g), torch.arange(2 * n).view(n, 2),
                            random_embeddings(lengths, tokens, g), with_tokens, (1 - cfg.short_caption_prob, cfg.short_caption_prob))
    null = random_embeddings(torch.tensor([2]), tokens, g)   # "" is [CLS] [SEP]
    return Recipe(build_ldm_unet(cfg), data, build_ldm_loss(cfg, null), cfg.train)


def garment_judge_recipe(profile: str) -> Recipe:
    "Chapter 11: the three-headed clothing judge, as `train_garment_judge` builds it (images at the trunk's size, native crops)."
    from ldm_course.judge import GarmentJudgeLoss, build_garment_judge  # torchmetrics: only here
    from ldm_course.metrics import eval_config  # torchmetrics: only here
    from ldm_course.garments import PATTERNS
    ecfg, g = eval_config(profile), torch.Generator().manual_seed(0)
    config = ecfg.garment_judge_config(GARMENT_TYPES, GARMENT_COLOURS, sorted(PATTERNS))
    n = num_items(ecfg.judge_train)
    data = TensorDataset(random_images(n, (3, config.image_size, config.image_size), g),
                         torch.randint(0, len(config.type_names), (n,), generator=g),
                         torch.randint(0, len(config.colour_names), (n,), generator=g),
                         random_images(n, (3, config.pattern_size, config.pattern_size), g),
                         torch.randint(0, len(config.pattern_names), (n,), generator=g))
    with torch_seeded(ecfg.judge_train.seed): model = build_garment_judge(config)
    return Recipe(model, data, GarmentJudgeLoss(), ecfg.judge_train)


CHAPTERS = {
    "05_mnist": Chapter("05 MNIST DDPM", "05_ddpm_mnist", ("train", "seconds_wall"), ("train", "steps"),
                        lambda p, L: ddpm_recipe("mnist", p)),
    "05_mnist_judge": Chapter("05 MNIST judge", "05_ddpm_mnist", ("judge", "train_seconds"), ("judge", "steps"),
                              lambda p, L: judge_recipe("mnist", p)),
    "06_cifar10": Chapter("06 CIFAR10 DDPM", "06_ddpm_cifar10", ("train", "seconds_wall"), ("train", "steps"),
                          lambda p, L: ddpm_recipe("cifar10", p)),
    "06_cifar10_judge": Chapter("06 CIFAR10 judge", "06_ddpm_cifar10", ("judge", "train_seconds"), ("judge", "steps"),
                                lambda p, L: judge_recipe("cifar10", p)),
    "07_vae_kl": Chapter("07 KL-VAE", "07_vae", ("kl", "train_seconds"), ("kl", "steps"), lambda p, L: vae_recipe("kl", p)),
    "07_vae_vq": Chapter("07 VQ-VAE", "07_vae", ("vq", "train_seconds"), ("vq", "steps"), lambda p, L: vae_recipe("vq", p)),
    "09_additive": Chapter("09 LDM, additive text", "09_ldm_additive", ("train", "seconds_wall"), ("train", "steps"),
                           lambda p, L: ldm_recipe(ldm_config(p, cond_dim=TEXT_DIM), p, L)),
    "10_cross_attention": Chapter("10 LDM, cross-attention", "10_cross_attention", ("train", "seconds_wall"), ("train", "steps"),
                                  lambda p, L: ldm_recipe(cross_attention_config(p, context_dim=TEXT_DIM), p, L)),
    "11_garment_judge": Chapter("11 clothing judge", "11_evaluation", ("judges", "fashion", "train_seconds"),
                                ("eval_config", "judge_train", "max_steps"), lambda p, L: garment_judge_recipe(p)),
}


def select_chapters(spec: str | None, parser: argparse.ArgumentParser) -> list[str]:
    "Row names, or chapter numbers standing for all their rows ('05' = MNIST's DDPM and judge); None: all."
    if spec is None: return list(CHAPTERS)
    chosen = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        matches = [k for k in CHAPTERS if item in (k, k.split("_")[0])]
        if not matches:
            numbers = sorted({k.split("_")[0] for k in CHAPTERS})
            parser.error(f"unknown chapter {item!r}; expected chapter numbers {numbers} or row names {list(CHAPTERS)}")
        chosen += [k for k in matches if k not in chosen]
    return chosen


def recipe_facts(recipe: Recipe) -> dict:
    "What decides the cost of a step, and the number of steps."
    t = recipe.train
    return {"parameters": count_parameters(recipe.model), "batch_size": t.batch_size, "grad_accum": t.grad_accum,
            "mixed_precision": t.mixed_precision, "num_workers": t.num_workers, "max_steps": t.max_steps,
            "dataset_items": len(recipe.dataset), "train_config": t.to_dict()}


def time_recipe(recipe: Recipe, device: torch.device, warmup: int, steps: int) -> dict:
    "Seconds per optimizer step of the Trainer over `steps` steps after `warmup`, from its own history."
    trainer = Trainer(recipe.model, recipe.dataset, recipe.loss_fn, recipe.train, checkpoint_dir=None, device=str(device))
    history = trainer.fit(resume=False, until_step=warmup + steps)
    images = recipe.train.batch_size * recipe.train.grad_accum  # the global batch of a step (chapter 04), whatever the processes
    seconds = [images / r for r in history.images_per_s]
    timed = seconds[warmup:]
    if not timed: raise ValueError(f"max_steps = {recipe.train.max_steps} leaves no step to time after {warmup} warm-up steps")
    median = statistics.median(timed)
    return {"seconds_per_step": median, "seconds_min": min(timed), "seconds_max": max(timed), "steps_timed": len(timed),
            "warmup_seconds": seconds[:warmup], "timed_seconds": timed,
            "projected_seconds": median * recipe.train.max_steps}


def measure(key: str, profile: str, tokens: int, device: torch.device, warmup: int, steps: int,
            precision: str | None = None, # "no", "bf16" or "fp16" instead of the recipe's own (None: the recipe's)
           ) -> dict:
    "One row: the recipe's facts and timing, or the error that stopped it (the other chapters still run)."
    chapter = CHAPTERS[key]
    row = {"chapter": key, "title": chapter.title, "notebook": chapter.notebook}
    if device.type == "cuda": torch.cuda.reset_peak_memory_stats(device)
    try:
        recipe = chapter.build(profile, tokens)
        if precision is not None: recipe = recipe._replace(train=recipe.train.replace(mixed_precision=precision))
        row.update(recipe_facts(recipe))
        row.update(time_recipe(recipe, device, warmup, steps))
    except Exception as e:   # out of memory, a missing package...: recorded in the row and printed
        row["error"] = f"{type(e).__name__}: {e}"
    if device.type == "cuda":
        row["peak_cuda_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        row["peak_cuda_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
    return row


def free_memory(device: torch.device) -> None:
    "Drop the last recipe's model, optimizer and EMA before the next one is built."
    gc.collect()
    if device.type == "cuda": torch.cuda.empty_cache()


def dig(d: Any, keys: tuple[str, ...]) -> Any:
    for k in keys: d = d.get(k) if isinstance(d, dict) else None
    return d


def shown(path: Path) -> str:
    "A path as the tables show it: relative to the repository when inside it."
    return str(path.relative_to(repo_root())) if path.is_relative_to(repo_root()) else str(path)


def notebook_records(runs: Path, device: torch.device) -> tuple[dict, dict, list[str]]:
    "Per notebook, its metrics and its pipeline wall time, when it ran on this kind of device; notes on what is skipped."
    metrics, walls, notes = {}, {}, []
    pipeline = runs / "pipeline.json"
    steps = json.loads(pipeline.read_text(encoding="utf-8")) if pipeline.is_file() else {}
    for notebook in dict.fromkeys(c.notebook for c in CHAPTERS.values()):
        path = runs / "metrics" / f"{notebook}.json"
        if not path.is_file(): continue
        m = json.loads(path.read_text(encoding="utf-8"))
        if not str(m.get("device", "")).startswith(device.type):
            notes.append(f"{shown(path)} was measured on {m.get('device')!r}, not {device.type}: not compared")
            continue
        metrics[notebook] = m
        if steps.get(notebook, {}).get("status") == "done": walls[notebook] = steps[notebook]["seconds"]
    return metrics, walls, notes


def recorded_training(row: dict, metrics: dict) -> dict | None:
    "The training seconds and steps the notebook recorded for this row's run."
    chapter = CHAPTERS[row["chapter"]]
    m = metrics.get(chapter.notebook)
    seconds, steps = dig(m, chapter.seconds_key), dig(m, chapter.steps_key)
    if seconds is None or not steps: return None
    return {"seconds": seconds, "steps": steps, "seconds_per_step": seconds / steps, "torch_threads": m.get("torch_threads")}


def notebook_table(rows: list[dict], walls: dict) -> list[dict]:
    "Per notebook: projected training (its rows) against its wall time in pipeline.json."
    out = []
    for notebook in dict.fromkeys(r["notebook"] for r in rows):
        mine = [r for r in rows if r["notebook"] == notebook]
        if notebook not in walls or any("error" in r for r in mine): continue
        projected = sum(r["projected_seconds"] for r in mine)
        out.append({"notebook": notebook, "rows": [r["chapter"] for r in mine], "projected_seconds": projected,
                    "wall_seconds": walls[notebook], "projected_share_of_wall": projected / walls[notebook]})
    return out


def duration(seconds: float) -> str:
    if seconds < 10: return f"{seconds:.1f} s"
    if seconds < 90: return f"{seconds:.0f} s"
    if seconds < 2 * 3600: return f"{seconds / 60:.1f} min"
    return f"{int(seconds // 3600)} h {round(seconds % 3600 / 60):02d} min"


def row_cells(r: dict, cuda: bool) -> list[str]:
    if "error" in r:
        error = r["error"].splitlines()[0].replace("|", "/")[:200]   # one line, no cell separator
        return [r["title"], "", "", "", f"failed: {error}", str(r.get("max_steps", "")), "—", "—"] + \
               ([f"{r['peak_cuda_gib']:.1f} GiB"] if cuda else [])
    batch = f"{r['batch_size']}" + (f" × {r['grad_accum']} accum." if r["grad_accum"] > 1 else "")
    rec = r.get("recorded")
    recorded = f"{duration(rec['seconds'])} ({rec['steps']} steps, {rec['seconds_per_step']:.3f} s/step)" if rec else "—"
    cells = [r["title"], f"{r['parameters'] / 1e6:.2f} M", batch, r["mixed_precision"],
             f"{r['seconds_per_step']:.3f} ({r['seconds_min']:.3f}–{r['seconds_max']:.3f})", f"{r['max_steps']:,}",
             duration(r["projected_seconds"]), recorded]
    return cells + ([f"{r['peak_cuda_gib']:.1f} GiB"] if cuda else [])


def markdown(rows: list[dict], notebooks: list[dict], meta: dict, info: dict) -> str:
    cuda = meta["device"] == "cuda"
    lines = [f"Training cost of the `{meta['profile']}` profile: each chapter's recipe (model, loss, Trainer, TrainConfig unchanged, "
             f"no checkpoints) on random data of the real shapes, {meta['warmup']} warm-up + {meta['steps']} timed steps, "
             f"projected = median s/step × max_steps; {describe(info)}.", "",
             "| chapter | model (params) | batch | mixed precision | s/step: median (min–max) | max_steps | projected training "
             f"| notebook's recorded training ({meta['runs']}) |" + (" peak CUDA memory |" if cuda else ""),
             "|---|---|---|---|---|---|---|---|" + ("---|" if cuda else "")]
    lines += ["| " + " | ".join(row_cells(r, cuda)) + " |" for r in rows]
    t = meta["total"]
    recorded = f"**{duration(t['recorded_seconds'])}**" + ("" if t["recorded_complete"] else " (rows with a record only)") \
        if t["recorded_seconds"] else "—"
    lines.append(f"| **total** | | | | | | **{duration(t['projected_seconds'])}** | {recorded} |" + (" |" if cuda else ""))
    if t["failed"]: lines += ["", f"Failed, not in the total: {', '.join(t['failed'])}."]
    if notebooks:
        lines += ["", f"Against each notebook's wall time in {meta['runs']}/pipeline.json (an upper bound for training: it also "
                      "holds data preparation, sampling and evaluation):", "",
                  "| notebook | projected training | notebook wall time | projected / wall |", "|---|---|---|---|"]
        lines += [f"| {n['notebook']} | {duration(n['projected_seconds'])} | {duration(n['wall_seconds'])} "
                  f"| {100 * n['projected_share_of_wall']:.0f} % |" for n in notebooks]
    lines += [""] + [f"Note: {n}." for n in meta["notes"]]
    return "\n".join(lines).rstrip() + "\n"


def thread_note(rows: list[dict], info: dict) -> list[str]:
    "Say so when the notebooks ran with another number of CPU threads than this run (CPU only: a GPU step does not care)."
    threads = sorted({r["recorded"]["torch_threads"] for r in rows if r.get("recorded")} - {None, info["torch_threads"]})
    if info["device"] != "cpu" or not threads: return []
    return [f"the notebooks recorded {', '.join(map(str, threads))} torch threads, this run used {info['torch_threads']}"]


def totals(rows: list[dict]) -> dict:
    ok = [r for r in rows if "error" not in r]
    recorded = [r["recorded"]["seconds"] for r in ok if r.get("recorded")]
    return {"projected_seconds": sum(r["projected_seconds"] for r in ok), "recorded_seconds": sum(recorded),
            "recorded_complete": len(recorded) == len(ok), "failed": [r["chapter"] for r in rows if "error" in r]}


def compare_precisions(keys: list[str], precisions: list[str], rounds: int, profile: str, tokens: int, device: torch.device,
                       warmup: int, steps: int) -> list[dict]:
    "Per recipe: median seconds per step of each precision over interleaved rounds, and each one's speed-up over the first."
    out = []
    for key in keys:
        times, errors = {p: [] for p in precisions}, {}
        for r in range(rounds):
            for precision in (precisions if r % 2 == 0 else precisions[::-1]):
                row = measure(key, profile, tokens, device, warmup, steps, precision)
                free_memory(device)
                if "error" in row: errors[precision] = row["error"]
                else: times[precision] += row["timed_seconds"]
        median = {p: statistics.median(t) for p, t in times.items() if t}
        base = precisions[0]
        out.append({"chapter": key, "title": CHAPTERS[key].title, "seconds_per_step": median, "errors": errors,
                    "speedup": {p: median[base] / m for p, m in median.items() if base in median}})
        print(f"{key}: " + ", ".join(f"{p} {m:.3f} s/step" for p, m in median.items()) +
              "".join(f"; {p}: {e}" for p, e in errors.items()), flush=True)
    return out


def precision_markdown(rows: list[dict], precisions: list[str], meta: dict, info: dict) -> str:
    names = {"no": "fp32", "bf16": "bf16 autocast", "fp16": "fp16 autocast"}
    lines = [f"Training step of each chapter's `{meta['profile']}` recipe in {', '.join(names[p] for p in precisions)}, "
             f"{meta['rounds']} interleaved rounds of {meta['warmup']} warm-up + {meta['steps']} timed steps, median s/step; "
             f"{describe(info)}.", "",
             "| chapter | " + " | ".join(f"{names[p]} s/step" for p in precisions) + " | " +
             " | ".join(f"speed-up {names[p]}" for p in precisions[1:]) + " |",
             "|---|" + "---|" * (2 * len(precisions) - 1)]
    for r in rows:
        cells = [f"{r['seconds_per_step'][p]:.3f}" if p in r["seconds_per_step"] else f"failed: {r['errors'].get(p, '?')[:60]}" for p in precisions]
        cells += [f"{r['speedup'][p]:.2f}×" if p in r["speedup"] else "—" for p in precisions[1:]]
        lines.append(f"| {r['title']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def parse_args(argv) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_machine_arguments(p, profile_help="run profile whose recipes are timed: smoke, cpu or gpu (default: gpu on CUDA, else cpu)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (DataLoader workers, allocator, cuDNN plans)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per recipe (median reported)")
    p.add_argument("--chapters", default=None, help=f"comma-separated chapter numbers or row names among {list(CHAPTERS)} (default: all)")
    p.add_argument("--precisions", nargs="+", choices=("no", "bf16", "fp16"), default=None,
                   help="time every recipe in these mixed precisions, interleaved, instead of its own (first = the reference)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds per precision with --precisions")
    p.add_argument("--tokens", type=int, default=24, help="caption length in tokens for chapters 09/10 (the real catalogue's: ~15-30)")
    args = p.parse_args(argv)
    if args.profile is not None and args.profile not in PROFILES: p.error(f"unknown profile {args.profile!r}; expected one of {PROFILES}")
    if args.warmup < 0 or args.steps < 1: p.error(f"need --warmup >= 0 and --steps >= 1, got {args.warmup} and {args.steps}")
    if args.tokens < 3: p.error(f"--tokens must be >= 3 (the null prompt has 2), got {args.tokens}")
    return args, select_chapters(args.chapters, p)


def main(argv=None):
    args, keys = parse_args(argv)
    device, profile, info = setup(args)
    start, runs = time.perf_counter(), runs_dir(profile)
    if args.precisions:
        rows = compare_precisions(keys, args.precisions, args.rounds, profile, args.tokens, device, args.warmup, args.steps)
        meta = {"profile": profile, "device": device.type, "warmup": args.warmup, "steps": args.steps, "rounds": args.rounds,
                "precisions": args.precisions}
        table = precision_markdown(rows, args.precisions, meta, info)
        print("\n" + table)
        payload = {"benchmark": "precision", "machine": info, **meta, "rows": rows, "seconds": round(time.perf_counter() - start, 1)}
        paths = write_result(f"precision_{profile}_{device.type}", payload, table, out_dir(args))
        print(f"wrote {paths[0]} and {paths[1].name}")
        return 0
    metrics, walls, notes = notebook_records(runs, device)
    rows = []
    for key in keys:
        rows.append(measure(key, profile, args.tokens, device, args.warmup, args.steps))
        free_memory(device)
        r = rows[-1]
        if "error" in r: print(f"{key}: FAILED, {r['error']}", file=sys.stderr, flush=True)
        else:
            r["recorded"] = recorded_training(r, metrics)
            print(f"{key}: {r['seconds_per_step']:.3f} s/step × {r['max_steps']} steps = {duration(r['projected_seconds'])}", flush=True)
    meta = {"profile": profile, "device": device.type, "warmup": args.warmup, "steps": args.steps, "runs": shown(runs),
            "total": totals(rows), "notes": notes + thread_note(rows, info)}
    notebooks = notebook_table(rows, walls)
    table = markdown(rows, notebooks, meta, info)
    print("\n" + table)
    payload = {"benchmark": "profile_cost", "machine": info, **meta, "tokens": args.tokens, "rows": rows, "notebooks": notebooks,
               "seconds": round(time.perf_counter() - start, 1),
               "command": " ".join(["bench/profile_cost.py", *(sys.argv[1:] if argv is None else argv)])}
    paths = write_result(f"profile_cost_{profile}_{device.type}", payload, table, out_dir(args))
    print(f"wrote {paths[0]} and {paths[1].name}")
    return 1 if meta["total"]["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
