"""Sampling: DDIM with 50 steps against the full DDPM chain of 1000 steps, with the same trained latent model.

Same pipeline (chapter 10's cross-attention model by default, else chapter 09's additive one), same prompts, same
starting latents z_T (same seeds), same classifier-free guidance; only the sampler changes. The prompts are the
captions of N real catalogue photos kept out of the clothing judge's training (chapter 11's split), so that one set
of images gives both measures:

- prompt accuracy: the chapter-11 clothing judge reads garment type and colour of each image, compared with the
  labels of the photo whose caption was the prompt ("both right" is the headline number);
- FID / KID against those N real photos in the judge's feature space, with the real-vs-real floor at N.

Wall time covers the whole generation (text encoding, the sampling loop, VAE decoding), per image: the median over
the generation calls (batches) of each sampler, after an untimed warm-up at the same batch shape.
DDPM-1000 is the pipeline's own sampler run with η = 1 over all 1000 training timesteps: DDIM with η = 1 and no
skipped step is exactly the ancestral DDPM chain (posterior variance β̃_t, Song et al. 2021 §4.1), so both samplers
share the pipeline's guidance code and its z_T.

    python bench/bench_sampling.py                           # CPU (or CUDA when present), profile cpu (gpu on CUDA)
    python bench/bench_sampling.py --num-images 500 --chapter 09_ldm_additive
    python bench/bench_sampling.py --profile smoke --num-images 2 --ddpm-steps 20 --ddim-steps 5 --out-dir /tmp/b  # check it runs

Needs the pipelines of chapters 09/10 and the judge of chapter 11 for the profile (run the notebooks first); without
them it says which file is missing and exits with status 2, writing nothing.
Targets: DDIM-50 ≥ 18× faster than DDPM-1000, with at most 3 points of prompt accuracy lost.
Writes bench/results/sampling_<device>.json and .md.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import add_machine_arguments, describe, out_dir, setup, synchronize, verdict, write_result  # noqa: E402

from ldm_course import attention  # noqa: E402,F401  (registers chapter 10's cross-attention block, to load its pipeline)
from ldm_course.benchmarks import BENCHMARK_TARGETS, UNRESOLVED_STD_ERROR  # noqa: E402  (the report judges with the same rule)
from ldm_course.core import make_generator  # noqa: E402
from ldm_course.fashion import load_fashion  # noqa: E402
from ldm_course.ldm import ldm_checkpoint_path  # noqa: E402
from ldm_course.ldm_pipeline import LatentDiffusionPipeline  # noqa: E402
from ldm_course.judge import judge_checkpoint_path, load_judge  # noqa: E402
from ldm_course.metrics import ClassifierFeatures, fid_kid, real_baseline  # noqa: E402
from ldm_course.alignment import PromptSpec, prompt_alignment  # noqa: E402

TARGET_SPEEDUP, TARGET_ACCURACY_LOSS = BENCHMARK_TARGETS["sampling"]["speedup"], BENCHMARK_TARGETS["sampling"]["accuracy_loss"]


def ddpm_generate(pipe: LatentDiffusionPipeline, prompts: list[str], steps: int, guidance_scale: float, seed: int) -> torch.Tensor:
    "Ancestral DDPM through the pipeline: DDIM with η = 1 (σ_t² = β̃_t) on `steps` timesteps; same z_T for the same seed."
    return pipe(prompts, num_inference_steps=steps, guidance_scale=guidance_scale, seed=seed, eta=1.0).images


def timed_generator(generate, device):
    "Wrap generate(prompts, seed) to record the synchronised wall time of each call in .calls as (seconds, images)."
    def wrapped(prompts, seed):
        synchronize(device)
        start = time.perf_counter()
        out = generate(prompts, seed)
        synchronize(device)
        wrapped.calls.append((time.perf_counter() - start, len(prompts)))
        return out
    wrapped.calls = []
    return wrapped


def seconds_per_image(calls: list[tuple[float, int]]) -> float:
    "Median over generation calls of seconds per image: one call slowed by other work on the machine does not count."
    return statistics.median(seconds / images for seconds, images in calls)


def heldout_photos(judge_meta: dict, profile: str, image_size: int, n: int):
    "The first n photos of chapter 11's held-out split (never seen by the judge), with captions and labels."
    key = judge_meta["cache_key"]
    catalogue, source = load_fashion(profile=profile, image_size=image_size, require=("articleType", "baseColour"), verbose=False)
    order = torch.randperm(len(catalogue), generator=make_generator(key["split_seed"]))
    heldout = order[:max(int(len(order) * key["heldout_fraction"]), 20)]
    if len(heldout) < 2 * n: raise SystemExit(f"only {len(heldout)} held-out photos: use --num-images <= {len(heldout) // 2}")
    images = torch.stack([catalogue[int(i)][0] for i in heldout])
    records = catalogue.records.iloc[heldout[:n].tolist()]
    return images, records, source


def trained_pipeline_and_judge(chapter: str | None, profile: str, script: str):
    "(latent pipeline checkpoint, clothing judge) of a run profile: chapter 10's pipeline, else 09's; None (said on stderr) when missing."
    chapters = [chapter] if chapter else ["10_cross_attention", "09_ldm_additive"]
    path = next((ldm_checkpoint_path(c, profile) for c in chapters if ldm_checkpoint_path(c, profile).is_file()), None)
    judge_path = judge_checkpoint_path("fashion", profile)
    missing = ([f"no latent pipeline ({', '.join(str(ldm_checkpoint_path(c, profile)) for c in chapters)}): run chapter(s) "
                f"{'/'.join(c[:2] for c in chapters)} with profile {profile}"] if path is None else []) + \
              ([f"no clothing judge ({judge_path}): run chapter 11 with profile {profile}"] if not judge_path.is_file() else [])
    if missing:
        print(f"{script}: nothing measured, " + "; ".join(missing), file=sys.stderr)
        return None
    return path, judge_path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_machine_arguments(p, profile_help="whose checkpoints: smoke, cpu or gpu (default: gpu on CUDA, else cpu)",
                          batch_help="prompts per generation call (default 24 on CPU, 250 on GPU)")
    p.add_argument("--chapter", default=None, help="10_cross_attention or 09_ldm_additive (default: 10 if present, else 09)")
    p.add_argument("--num-images", type=int, default=None, help="images per sampler (default 96 on CPU, 500 on GPU)")
    p.add_argument("--ddim-steps", type=int, default=50)
    p.add_argument("--ddpm-steps", type=int, default=1000)
    p.add_argument("--guidance-scale", type=float, default=None, help="w (default: the pipeline's)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    device, profile, info = setup(args, cpu_batch=24, gpu_batch=250)
    n, batch_size = args.num_images or (500 if device.type == "cuda" else 96), args.batch_size

    found = trained_pipeline_and_judge(args.chapter, profile, "bench_sampling")
    if found is None: return 2
    path, judge_path = found
    start = time.perf_counter()
    pipe = LatentDiffusionPipeline.load(path, device=device)
    judge, judge_meta = load_judge(judge_path, device)
    w = pipe.config.guidance_scale if args.guidance_scale is None else args.guidance_scale
    real, records, source = heldout_photos(judge_meta, profile, pipe.vae.config.image_size, n)
    held = {tuple(p) for p in pipe.held_out_pairs}
    specs = [PromptSpec(r.caption, r.articleType, r.baseColour, "held-out" if (r.articleType, r.baseColour) in held else "catalogue")
             for r in records.itertuples()]
    print(f"{path} ({pipe.config.conditioning}), w = {w:g}; {n} prompts = captions of held-out {source.source} photos", flush=True)

    samplers = {f"ddim-{args.ddim_steps}": timed_generator(lambda pr, s: pipe(pr, num_inference_steps=args.ddim_steps, guidance_scale=w, seed=s).images, device),
                f"ddpm-{args.ddpm_steps}": timed_generator(lambda pr, s: ddpm_generate(pipe, pr, args.ddpm_steps, w, s), device)}
    # untimed warm-up at the timed batch shape: oneDNN primitives, allocator and text encoder are set up once, outside both timings
    pipe([s.prompt for s in specs[:batch_size]], num_inference_steps=2, guidance_scale=w, seed=0)
    feature = ClassifierFeatures(judge)
    floor = real_baseline(real, n, feature, seed=args.seed)
    rows, correct = {}, {}
    for name, generate in samplers.items():
        result = prompt_alignment(generate, specs, judge, num_samples=1, seed=args.seed, batch_size=batch_size)
        images = torch.cat(result.samples)   # one image per prompt, in prompt order
        correct[name] = torch.tensor(result.per_prompt["both"].to_numpy(), dtype=torch.float64)  # 0/1 per image (one per prompt)
        overall = result.summary().loc["overall"]
        rows[name] = {"seconds": sum(s for s, _ in generate.calls), "seconds_per_image": seconds_per_image(generate.calls),
                      "calls": [[round(s, 3), k] for s, k in generate.calls],
                      "type": float(overall["type"]), "colour": float(overall["colour"]), "both": float(overall["both"]),
                      **fid_kid(real[:n], images, feature, seed=args.seed)}
        r = rows[name]
        print(f"{name}: {r['seconds']:.1f} s ({r['seconds_per_image']:.3f} s/image), type {r['type']:.1%}, colour {r['colour']:.1%}, "
              f"both {r['both']:.1%}, FID {r['fid']:.2f}, KID {r['kid']:.4f}", flush=True)
    ddim, ddpm = rows[f"ddim-{args.ddim_steps}"], rows[f"ddpm-{args.ddpm_steps}"]
    speedup = ddpm["seconds_per_image"] / ddim["seconds_per_image"]
    loss = ddpm["both"] - ddim["both"]
    # paired: image i of both samplers comes from the same prompt and the same z_T, so only the discordant pairs vary
    diff = correct[f"ddpm-{args.ddpm_steps}"] - correct[f"ddim-{args.ddim_steps}"]
    se = float(diff.std(unbiased=True) / n ** 0.5) if n > 1 else float("nan")
    table = "\n".join([
        f"Sampling the same latent pipeline ({path.parent.name}, {pipe.config.conditioning}, w = {w:g}) on {n} prompts "
        f"(captions of held-out catalogue photos), same z_T; {describe(info)}.", "",
        "| sampler | s/image | type | colour | type and colour | FID (judge features) | KID |", "|---|---|---|---|---|---|---|",
        *[f"| {k} | {r['seconds_per_image']:.3f} | {r['type']:.1%} | {r['colour']:.1%} | {r['both']:.1%} | {r['fid']:.2f} | {r['kid']:.4f} |" for k, r in rows.items()],
        f"| real vs real (floor, N = {n}) | | | | | {floor['fid']:.2f} | {floor['kid']:.4f} |", "",
        f"Speed-up DDIM-{args.ddim_steps} over DDPM-{args.ddpm_steps}: {speedup:.1f}× (target ≥ {TARGET_SPEEDUP:g}×: {verdict(speedup, TARGET_SPEEDUP)}). "
        f"Prompt accuracy lost by DDIM: {100 * loss:+.1f} points ± {100 * se:.1f} (paired std error at N = {n}, "
        f"{int((diff != 0).sum())} discordant images; target ≤ 3 points: "
        f"{verdict(loss, TARGET_ACCURACY_LOSS, higher_is_better=False)}" + ("" if se <= UNRESOLVED_STD_ERROR else ", not resolved at this N") + "). "
        f"FID difference (DDIM − DDPM): {ddim['fid'] - ddpm['fid']:+.2f}."])
    print("\n" + table)
    payload = {"benchmark": "sampling", "machine": info, "profile": profile, "pipeline": str(path), "conditioning": pipe.config.conditioning,
               "guidance_scale": w, "num_images": n, "results": rows, "real_vs_real": floor, "speedup": speedup,
               "accuracy_loss": loss, "accuracy_loss_std_error": se, "fid_difference": ddim["fid"] - ddpm["fid"],
               "targets": {"speedup": TARGET_SPEEDUP, "accuracy_loss": TARGET_ACCURACY_LOSS},
               "target_met": {"speedup": speedup >= TARGET_SPEEDUP, "accuracy_loss": loss <= TARGET_ACCURACY_LOSS},
               "seconds": round(time.perf_counter() - start, 1)}
    paths = write_result(f"sampling_{device.type}", payload, table + "\n", out_dir(args))
    print(f"wrote {paths[0]} and {paths[1].name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
