"""Does chapter 11's clothing judge read the garment or the backdrop? The same recipe trained without and with the
random-backdrop augmentation, then scored on the same photos and generated images.

Chapter 11's judge learns on catalogue photos, all on a pure white backdrop; generated images have a faint uneven
haze instead. For each judge (`backdrop` = 0: the recipe before 2026-12-07; the chapter's default: half of the training
photos on a random backdrop), on chapter 11's held-out split:

- held-out photos as they are, and the same photos on a random backdrop (`judge.random_backdrop`, p = 1, fixed seed):
  a judge that reads the garment gives the same accuracies;
- when the profile's chapter 10 pipeline exists, images generated for the seed report's five prompts (DDIM, the
  pipeline's w), read as generated and with the backdrop set back to white (`judge.whiten_backdrop`).

Both judges use chapter 11's split, configuration and recipe (`eval_config(profile)`: same seed, same precision);
differences of accuracy on the same images are paired (standard error from the per-image differences).

    python bench/judge_backdrop.py                                           # cpu profile: two judge trainings
    python bench/judge_backdrop.py --profile smoke --images-per-prompt 2 --out-dir /tmp/b   # checks it runs

Writes bench/results/judge_backdrop_<profile>_<device>.json and .md.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import Subset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import add_machine_arguments, describe, out_dir, setup, write_result  # noqa: E402

from ldm_course import attention  # noqa: E402,F401  (registers chapter 10's cross-attention block, to load its pipeline)
from ldm_course.alignment import paired_difference  # noqa: E402
from ldm_course.core import make_generator, resolve_profile  # noqa: E402
from ldm_course.fashion import load_fashion  # noqa: E402
from ldm_course.garments import SEED_PROMPTS  # noqa: E402
from ldm_course.judge import (  # noqa: E402
    BACKDROP_STRENGTH, judge_inputs, predict_garments, random_backdrop, train_garment_judge, whiten_backdrop,
)
from ldm_course.ldm import ldm_checkpoint_path  # noqa: E402
from ldm_course.ldm_pipeline import LatentDiffusionPipeline  # noqa: E402
from ldm_course.metrics import eval_config, judge_pattern_labels  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_machine_arguments(p, profile_help="whose split, recipe and pipeline (default: cpu, or gpu on CUDA)")
    p.add_argument("--images-per-prompt", type=int, default=12, help="generated images per seed prompt (0: none)")
    args = p.parse_args(argv)
    device, profile, info = setup(args)
    profile = resolve_profile(profile)
    ecfg = eval_config(profile)
    seed = ecfg.judge_train.seed
    catalogue, source = load_fashion(profile=profile, require=("articleType", "baseColour"), verbose=False)
    types, type_names = catalogue.labels("articleType")
    colours, colour_names = catalogue.labels("baseColour")
    patterns, pattern_names = judge_pattern_labels(catalogue.records, source.source)
    order = torch.randperm(len(catalogue), generator=make_generator(seed))   # chapter 11's split
    n_heldout = max(int(len(order) * ecfg.heldout_fraction), 20)
    heldout, train = order[:n_heldout], order[n_heldout:]
    config = ecfg.garment_judge_config(type_names, colour_names, pattern_names)
    strength = BACKDROP_STRENGTH
    photos = torch.stack([catalogue[int(i)][0] for i in heldout]).float()
    stained = random_backdrop(photos, strength, p=1.0, generator=make_generator(seed + 7))
    readings = {"white": judge_inputs(config, photos), "random backdrop": judge_inputs(config, stained)}
    inputs = judge_inputs(config, Subset(catalogue, train.tolist()))

    generated, expected, pipeline = None, None, ldm_checkpoint_path("10_cross_attention", profile)
    if args.images_per_prompt > 0 and pipeline.is_file():
        pipe = LatentDiffusionPipeline.load(pipeline, device=device)
        prompts = [pr for pr in SEED_PROMPTS for _ in range(args.images_per_prompt)]
        generated = pipe(prompts, seed=seed).images.float()
        expected = torch.tensor([type_names.index(SEED_PROMPTS[pr][0]) for pr in prompts])
    elif args.images_per_prompt > 0:
        print(f"no chapter 10 pipeline at {pipeline}: generated images not measured", flush=True)

    rows = []
    for backdrop in (0.0, strength):
        start = time.perf_counter()
        judge, _ = train_garment_judge(inputs, types[train], colours[train], config, ecfg.judge_train,
                                       pattern_labels=patterns[train], backdrop=backdrop, device=str(device))
        row = {"backdrop": backdrop, "train_seconds": round(time.perf_counter() - start, 1)}
        pred = {name: predict_garments(judge, x) for name, x in readings.items()}
        for head, truth in (("type", types[heldout]), ("colour", colours[heldout])):
            row[f"photos_{head}"] = paired_difference(getattr(pred["white"], head) == truth, getattr(pred["random backdrop"], head) == truth)
        if generated is not None:
            as_is = predict_garments(judge, generated).type == expected
            row["generated_type"] = paired_difference(as_is, predict_garments(judge, whiten_backdrop(generated)).type == expected)
        rows.append(row)
        print(f"judge trained with backdrop {backdrop:g} ({row['train_seconds']:.0f} s): photos type "
              f"{row['photos_type']['first']:.1%} on white, {row['photos_type']['second']:.1%} on a random backdrop"
              + (f"; generated type {row['generated_type']['first']:.1%} as generated, "
                 f"{row['generated_type']['second']:.1%} backdrop whitened" if generated is not None else ""), flush=True)

    fmt = lambda r: f"{r['first']:.1%} | {r['second']:.1%} | {100 * r['difference']:+.1f} ± {100 * r['difference_se']:.1f}"
    lines = [f"Chapter 11's judge ({profile} recipe, {ecfg.judge_train.mixed_precision} training, seed {seed}) trained without "
             f"and with the random backdrop; {n_heldout} held-out {source.source} photos"
             + (f", {len(generated)} images of {pipeline.parent.name} for the seed prompts" if generated is not None else "")
             + f"; {describe(info)}.", "",
             "| judge trained with backdrop | reading | as is | changed | change (paired SE) |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['backdrop']:g} | photos, type: white → random backdrop | {fmt(r['photos_type'])} points |")
        lines.append(f"| {r['backdrop']:g} | photos, colour: white → random backdrop | {fmt(r['photos_colour'])} points |")
        if "generated_type" in r:
            lines.append(f"| {r['backdrop']:g} | generated, type: as generated → backdrop whitened | {fmt(r['generated_type'])} points |")
    table = "\n".join(lines) + "\n"
    print("\n" + table)
    payload = {"benchmark": "judge_backdrop", "machine": info, "profile": profile, "backdrop_strength": strength,
               "num_heldout": n_heldout, "data_source": source.source, "rows": rows,
               "pipeline": str(pipeline) if generated is not None else None}
    write_result(f"judge_backdrop_{profile}_{device.type}", payload, table, out_dir(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
