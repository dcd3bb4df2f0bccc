"""Same weights before and after a refactor: compare the final training checkpoints of chapters in two runs folders.

A refactor that should not change behaviour must give the same trained weights on the same seeds. Train the chapters
once with the old code and once with the new (e.g. `ldm-course train 05 --profile cpu` with `LDM_COURSE_RUNS` pointing
at two folders and `LDM_COURSE_DATA` at the same data), then:

    python bench/compare_checkpoints.py --before /tmp/before --after /tmp/after --chapters 05_ddpm_mnist,10_cross_attention

For each chapter, the last `step_*.safetensors` of each runs folder is read and every tensor compared bit for bit:
model and EMA weights, optimizer state, random generator states, training history. The measured speed
(`/history/images_per_s`) is expected to differ and is listed apart. Exit status 0 when every other tensor is equal.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from safetensors.torch import load_file

TIMING_TENSORS = ("/history/images_per_s",)   # wall-clock measurements: never equal between two runs


def final_checkpoint(runs: Path, profile: str, chapter: str) -> Path:
    "The last training checkpoint of a chapter in a runs folder."
    found = sorted((runs / profile / "checkpoints" / chapter).glob("train-*/step_*.safetensors"))
    if not found: raise FileNotFoundError(f"no training checkpoint under {runs / profile / 'checkpoints' / chapter}/train-*/")
    return found[-1]


def compare(before: Path, after: Path) -> dict:
    "Tensors of two checkpoints: how many, which differ (timings apart), which exist in only one."
    a, b = load_file(str(before)), load_file(str(after))
    only = sorted(set(a) ^ set(b))
    differ = sorted(k for k in set(a) & set(b) if not (a[k].shape == b[k].shape and a[k].dtype == b[k].dtype and a[k].equal(b[k])))
    weights = [k for k in a if k.startswith(("/model/", "/ema/"))]
    return {"tensors": len(a), "weight_tensors": len(weights), "weight_numbers": sum(a[k].numel() for k in weights),
            "differ": [k for k in differ if k not in TIMING_TENSORS], "timings_differ": [k for k in differ if k in TIMING_TENSORS],
            "only_in_one": only}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", type=Path, required=True, help="runs folder trained with the old code")
    p.add_argument("--after", type=Path, required=True, help="runs folder trained with the new code")
    p.add_argument("--profile", default="cpu", help="the profile both trained (default: cpu)")
    p.add_argument("--chapters", default="05_ddpm_mnist,10_cross_attention", help="comma-separated chapter folders")
    args = p.parse_args(argv)
    same = True
    for chapter in (c.strip() for c in args.chapters.split(",") if c.strip()):
        r = compare(final_checkpoint(args.before, args.profile, chapter), final_checkpoint(args.after, args.profile, chapter))
        ok = not r["differ"] and not r["only_in_one"]
        same &= ok
        print(f"{chapter}: {r['tensors']} tensors, {r['weight_tensors']} of model and EMA weights ({r['weight_numbers']:,} numbers): "
              + ("bit-identical" if ok else f"DIFFERENT: {r['differ'][:5]} {r['only_in_one'][:5]}")
              + (f" (timings differ, as expected: {r['timings_differ']})" if r["timings_differ"] else ""))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
