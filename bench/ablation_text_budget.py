"""Prompt alignment of chapter 10's text-to-image model against its training budget and its architecture (a study).

Chapter 10 trains its cross-attention latent model with chapter 09's recipe (on the cpu profile: 600 steps of 64
latents, cross-attention at the 8×8 and 4×4 levels). Which change would bring the seed report's prompts to the
targets of issue 5 (≥ 90 % garment type, ≥ 95 % colour), and at what cost in training time? Each variant changes one
thing and is trained here on the same cached latents and caption embeddings (chapter 09's `prepare_ldm_data`):

- the number of steps (more images seen), or the number of steps at the same number of images (smaller batches);
- the levels that carry cross-attention (4×4 only: cheaper steps);
- the pooled text vector added to the time embedding as well (chapter 09's mechanism beside the tokens).

Every variant samples chapter 11's prompts (the seed report's five, the held-out pairs, a seeded draw of catalogue
pairs) with the pipeline's DDIM sampler at w = 3, the same seeds for every variant, and chapter 11's clothing judge
scores each image. Training seconds are wall time on this machine: run nothing else meanwhile.

    python bench/ablation_text_budget.py                                     # every variant, seed 0, 8 images per prompt
    python bench/ablation_text_budget.py --variants chapter10,steps900 --seeds 0,1
    python bench/ablation_text_budget.py --profile smoke --variants chapter10 --num-samples 1 --out-dir /tmp/a  # check it runs

Needs chapter 11's clothing judge for the profile (and chapter 07's VAE, else a fallback one is trained): without the
judge it says so and exits with status 2, writing nothing. Not part of `run_all.py`: on the CPU each variant trains
for minutes. Writes bench/results/ablation_text_<device>.json and .md.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import add_machine_arguments, describe, out_dir, setup, write_result  # noqa: E402

from ldm_course.cross_attention import cross_attention_config  # noqa: E402
from ldm_course.ldm import LDMConfig, build_ldm_scheduler, prepare_ldm_data, train_ldm  # noqa: E402
from ldm_course.ldm_pipeline import LatentDiffusionPipeline  # noqa: E402
from ldm_course.judge import judge_checkpoint_path, load_judge  # noqa: E402
from ldm_course.metrics import eval_config, pipeline_generate  # noqa: E402
from ldm_course.alignment import evaluation_prompts, prompt_alignment  # noqa: E402
from ldm_course.text import load_text_encoder  # noqa: E402

MISSING_INPUTS = 2
TARGETS = {"type": 0.90, "colour": 0.95}   # issue 5, on the seed report's prompts and on the held-out pairs
VARIANTS = {   # name -> (what changes, in words; the changes)
    "chapter10": ("chapter 10 as it is", {}),
    "steps900": ("900 steps (1.5× the images)", {"max_steps": 900}),
    "steps900-batch43": ("900 steps of 43 (the images of 600 × 64)", {"max_steps": 900, "batch_size": 43}),
    "level2-steps900": ("cross-attention at 4×4 only, 900 steps", {"max_steps": 900, "levels": (2,)}),
    "pooled-steps900": ("pooled vector added as well, 900 steps", {"max_steps": 900, "pooled": True}),
}


def variant_config(profile: str, context_dim: int, pooled_dim: int, changes: dict, seed: int) -> LDMConfig:
    "Chapter 10's experiment for `profile` with one variant's changes and the training seed."
    cfg = cross_attention_config(profile, context_dim=context_dim, cond_dim=pooled_dim if changes.get("pooled") else None)
    if "levels" in changes: cfg = cfg.replace(unet=cfg.unet.replace(cross_attention_levels=tuple(changes["levels"])))
    recipe = {k: changes[k] for k in ("max_steps", "batch_size") if k in changes}
    return cfg.replace(train=cfg.train.replace(seed=seed, **recipe))


def markdown_table(rows: list[dict], meta: dict) -> str:
    "One row per (variant, seed): recipe, training time, accuracies per prompt group."
    pct = lambda group, key, r: f"{100 * r['alignment'][group][key]:.0f}" if group in r["alignment"] else "—"
    lines = [f"Prompt alignment of chapter 10's model by variant ({meta['profile']} profile, {meta['device_name']}, "
             f"{meta['threads']} threads): DDIM {meta['ddim_steps']} steps, w = {meta['guidance_scale']:g}, "
             f"{meta['num_samples']} images per prompt, chapter 11's clothing judge (type / colour in %). Targets on the "
             f"seed and held-out prompts: type ≥ {100 * TARGETS['type']:.0f} %, colour ≥ {100 * TARGETS['colour']:.0f} %.", "",
             "| variant | seed | steps × batch | train s | seed prompts | held-out pairs | catalogue | images |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [f"{pct(g, 'type', r)} / {pct(g, 'colour', r)}" for g in ("seed", "held-out", "catalogue")]
        lines.append(f"| {r['variant']}: {r['description']} | {r['seed']} | {r['max_steps']} × {r['batch_size']} | "
                     f"{r['train_seconds']:.0f} | " + " | ".join(cells) + f" | {r['alignment']['overall']['num_images']} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, among {list(VARIANTS)}")
    p.add_argument("--seeds", default="0", help="comma-separated training seeds")
    p.add_argument("--num-samples", type=int, default=8, help="images per prompt")
    p.add_argument("--guidance-scale", type=float, default=3.0, help="w of classifier-free guidance")
    p.add_argument("--encoder", default="auto", help="text encoder, as in the notebooks")
    add_machine_arguments(p, profile_help="run profile whose latents and judge are used (default: cpu, gpu on CUDA)")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown: p.error(f"unknown variants {unknown}; expected among {list(VARIANTS)}")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    device, profile, info = setup(args)

    judge_path = judge_checkpoint_path("fashion", profile)
    if not judge_path.is_file():
        print(f"no clothing judge at {judge_path}: run chapter 11 (notebook 11_evaluation) with profile {profile} first",
              file=sys.stderr)
        return MISSING_INPUTS
    judge, _ = load_judge(judge_path, device)
    encoder = load_text_encoder(args.encoder, device=device, verbose=False)
    # No variant changes the data (held-out pairs, items, tokens): prepare it and draw the prompts once.
    base = variant_config(profile, encoder.token_dim, encoder.dim, {}, 0)
    data = prepare_ldm_data(base, encoder, profile, "auto", 0, device, with_tokens=True)   # cached latents and captions
    records = data.dataset.records
    pairs = sorted(set(zip(records["articleType"], records["baseColour"])))
    prompts = evaluation_prompts(pairs, base.held_out_pairs, eval_config(profile).num_catalogue_prompts, 0)   # chapter 11's draw
    rows = []
    for name in names:
        description, changes = VARIANTS[name]
        for seed in seeds:
            cfg = variant_config(profile, encoder.token_dim, encoder.dim, changes, seed)
            unet, history, seconds = train_ldm(cfg, data.train_set, data.null, device=str(device))
            pipe = LatentDiffusionPipeline(data.vae, unet, encoder, build_ldm_scheduler(cfg), cfg)
            start = time.perf_counter()
            result = prompt_alignment(pipeline_generate(pipe, cfg.num_inference_steps, args.guidance_scale), prompts, judge,
                                      num_samples=args.num_samples, seed=1000)
            row = {"variant": name, "description": description, "seed": seed, "max_steps": cfg.train.max_steps,
                   "batch_size": cfg.train.batch_size, "cross_attention_levels": list(cfg.unet.cross_attention_levels),
                   "conditioning": cfg.conditioning, "train_seconds": seconds, "sample_seconds": time.perf_counter() - start,
                   "final_loss": sum(history.loss[-20:]) / len(history.loss[-20:]),
                   "alignment": result.summary_dict(), "per_prompt": result.per_prompt.to_dict("records")}
            rows.append(row)
            seed_group = row["alignment"].get("seed", {})
            print(f"{name} seed {seed}: {seconds:.0f} s of training; seed prompts type {100 * seed_group.get('type', float('nan')):.0f} %, "
                  f"colour {100 * seed_group.get('colour', float('nan')):.0f} %", flush=True)
    meta = {"profile": profile, "device_name": describe(info), "threads": torch.get_num_threads(),
            "ddim_steps": cross_attention_config(profile).num_inference_steps, "guidance_scale": args.guidance_scale,
            "num_samples": args.num_samples, "targets": TARGETS, "encoder": encoder.name,
            "command": " ".join(["bench/ablation_text_budget.py", *(sys.argv[1:] if argv is None else argv)])}
    table = markdown_table(rows, meta)
    print("\n" + table)
    paths = write_result(f"ablation_text_{device.type}", {"benchmark": "ablation_text", "machine": info, "meta": meta,
                                                          "results": rows}, table, out_dir(args))
    print(f"wrote {paths[0]} and {paths[1].name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
