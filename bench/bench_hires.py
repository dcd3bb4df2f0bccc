"""The LDM thesis at high resolution: sampling a 256×256 image costs about what a 64×64 one costs.

Both text-to-image pipelines diffuse on the same c×16×16 latent (c = 16 on the cpu profile) with the same
cross-attention U-Net (chapter 10's configuration of the profile), the same offline text encoder (MiniLM), DDIM with classifier-free guidance; they
differ only by the autoencoder that decodes the final latent: f = 4 (64×64 images, the course before issue 16: the
64-px autoencoder of chapter 07's former cpu preset, given the U-Net's c latent channels) or f = 16 (256×256, chapter
07 now). Weights are random: the
time of a forward pass does not depend on them. The two are timed interleaved (64, 256, 256, 64, ...), median of
the repeats, text encoding and decoding included.

Reference: what latent diffusion avoids, the same U-Net (same widths, levels and attention) trained directly on
256×256×3 pixels. One of its DDIM steps is timed (a few repeats) and multiplied by the number of steps: at this size
a full sample would take minutes on a CPU, and every step costs the same.

    python bench/bench_hires.py                       # CPU (or CUDA when present), cpu profile, DDIM-50
    python bench/bench_hires.py --profile smoke --batch-size 2 --repeats 1 --steps 2 --out-dir /tmp/b   # check that it runs

Target: time per image at 256×256 ≤ 1.5× the time at 64×64. Writes bench/results/hires_<device>.json and .md.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import add_machine_arguments, describe, out_dir, seconds_of, setup, verdict, write_result  # noqa: E402

from ldm_course.cross_attention import cross_attention_config  # noqa: E402
from ldm_course.benchmarks import BENCHMARK_TARGETS  # noqa: E402
from ldm_course.ldm import build_ldm_scheduler, build_ldm_unet, text_condition  # noqa: E402
from ldm_course.ldm_pipeline import LatentDiffusionPipeline  # noqa: E402
from ldm_course.text import load_text_encoder  # noqa: E402
from ldm_course.unet import UNet, count_parameters  # noqa: E402
from ldm_course.vae import VAEConfig, build_vae, vae_config  # noqa: E402

TARGET_RATIO = BENCHMARK_TARGETS["hires"]["ratio"]   # the course's target, shared with the report
PROMPTS = ("a red dress", "blue T-Shirt", "pink tshirt", "a yellow jean", "black dress", "a red striped shirt",
           "a blue checked skirt", "a green jacket")


def thumbnail_vae_config(latent_channels: int = 4) -> VAEConfig:
    "The 64×64 → c×16×16 autoencoder (f = 4) of the course before issue 16 (chapter 07's former cpu preset had c = 4)."
    return VAEConfig(image_size=64, block_out_channels=(16, 32, 64), latent_channels=latent_channels, norm_groups=8,
                     recon_loss="mse", colour_shortcut=True)


def pipelines(profile: str, device: torch.device) -> dict[str, LatentDiffusionPipeline]:
    "Two pipelines sharing one U-Net and one text encoder; only the autoencoder (f = 4 at 64 px, or the profile's) differs."
    text_encoder = load_text_encoder("minilm", device=device)
    cfg = cross_attention_config(profile, context_dim=text_encoder.token_dim)
    unet, scheduler = build_ldm_unet(cfg).to(device), build_ldm_scheduler(cfg)
    vaes = {"thumbnail": build_vae(thumbnail_vae_config(cfg.unet.in_channels)), "hires": build_vae(vae_config("kl", profile))}
    for name, vae in vaes.items():
        if vae.config.latent_shape != (cfg.unet.in_channels, 16, 16) and profile != "smoke":
            raise ValueError(f"{name} autoencoder gives latents {vae.config.latent_shape}, expected {cfg.unet.in_channels}×16×16")
    return {name: LatentDiffusionPipeline(vae, unet, text_encoder, scheduler, cfg) for name, vae in vaes.items()}


def time_pipelines(pipes: dict, batch_size: int, steps: int, repeats: int, device: torch.device) -> dict:
    "Median seconds per image of each pipeline (text encoding, DDIM with guidance, decoding), timed interleaved."
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch_size)]
    calls = {k: (lambda p=p: p(prompts, num_inference_steps=steps, guidance_scale=3.0, seed=0, sampler="ddim")) for k, p in pipes.items()}
    with torch.no_grad():
        for call in calls.values(): seconds_of(call, device)   # warm-up at the timed batch shape (oneDNN plans)
        times = {k: [] for k in calls}
        for r in range(repeats):
            for k in (list(calls) if r % 2 == 0 else list(calls)[::-1]): times[k].append(seconds_of(calls[k], device) / batch_size)
        decode = {k: statistics.median(seconds_of(lambda p=p: p.decode(torch.randn(batch_size, *p.latent_shape, device=device)), device)
                                       for _ in range(max(1, repeats))) / batch_size for k, p in pipes.items()}
    return {"seconds_per_image": {k: statistics.median(v) for k, v in times.items()}, "seconds_raw": times,
            "decode_seconds_per_image": decode,
            "image_size": {k: p.vae.config.image_size for k, p in pipes.items()},
            "downsample_factor": {k: p.vae.config.downsample_factor for k, p in pipes.items()}}


def pixel_step_seconds(pipe: LatentDiffusionPipeline, size: int, batch_size: int, repeats: int, device: torch.device) -> dict:
    "Seconds of one guided denoising step (conditional + unconditional forward) of the same U-Net on size×size×3 pixels."
    unet = pixel_unet(pipe).to(device).eval()
    emb = pipe.encode_prompts([PROMPTS[i % len(PROMPTS)] for i in range(batch_size)])
    expand = lambda kwargs: {k: v.expand(batch_size, *v.shape[1:]) for k, v in kwargs.items()}
    cond, uncond = text_condition(unet.config, emb), expand(text_condition(unet.config, pipe.null_embedding))
    x, t = torch.randn(batch_size, 3, size, size, device=device), torch.full((batch_size,), 500, device=device)
    with torch.no_grad():
        step = lambda: (unet(x, t, **cond), unet(x, t, **uncond))   # classifier-free guidance: two forwards per step
        seconds_of(step, device)
        times = [seconds_of(step, device) for _ in range(repeats)]
    return {"seconds_per_step_per_image": statistics.median(times) / batch_size, "parameters": count_parameters(unet),
            "input_shape": [3, size, size]}


def pixel_unet(pipe: LatentDiffusionPipeline) -> UNet:
    "The pipeline's U-Net architecture (widths, levels, self- and cross-attention) with 3 input and output channels."
    cfg = pipe.config.replace(unet=pipe.config.unet.replace(in_channels=3, out_channels=3))
    return build_ldm_unet(cfg)


def markdown(r: dict, info: dict) -> str:
    s, d = r["sampling"]["seconds_per_image"], r["sampling"]["decode_seconds_per_image"]
    lines = [f"High-resolution sampling through the same 16×16 latent (DDIM-{r['steps']} with guidance, text encoding and "
             f"decoding included), {describe(info)}.", "",
             "| pipeline | image | f | seconds per image | of which decoding | ratio to 64×64 | target ≤ 1.5× |",
             "|---|---|---|---|---|---|---|"]
    for k, label in (("thumbnail", "64×64 (course before issue 16)"), ("hires", f"{r['sampling']['image_size']['hires']}² (chapter 07 now)")):
        ratio = s[k] / s["thumbnail"]
        lines.append(f"| {label} | {r['sampling']['image_size'][k]}×{r['sampling']['image_size'][k]} | {r['sampling']['downsample_factor'][k]} "
                     f"| {s[k]:.3f} | {d[k]:.3f} | {ratio:.2f}× | {verdict(ratio, TARGET_RATIO, higher_is_better=False) if k == 'hires' else ''} |")
    p = r["pixel"]
    lines += ["", f"Reference, what latent diffusion avoids: the same U-Net ({p['parameters'] / 1e6:.2f} M parameters with 3 channels) "
                  f"on {p['input_shape'][1]}×{p['input_shape'][2]}×3 pixels takes {p['seconds_per_step_per_image']:.3f} s per guided "
                  f"step and image, so {p['seconds_per_image']:.1f} s for DDIM-{r['steps']} (one step timed, ×{r['steps']}): "
                  f"{p['seconds_per_image'] / s['hires']:.0f}× the latent pipeline at the same resolution."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_machine_arguments(p, profile_help="pipeline presets: smoke, cpu or gpu (default: gpu on CUDA, else cpu)",
                          batch_help="images per pipeline call (default 8 on CPU, 32 on GPU)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per pipeline (median reported)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    args = p.parse_args(argv)
    device, profile, info = setup(args, cpu_batch=8, gpu_batch=32)
    start = time.perf_counter()
    pipes = pipelines(profile, device)
    sampling = time_pipelines(pipes, args.batch_size, args.steps, args.repeats, device)
    size = sampling["image_size"]["hires"]
    pixel = pixel_step_seconds(pipes["hires"], size, max(1, args.batch_size // 4), args.repeats, device)
    pixel["seconds_per_image"] = pixel["seconds_per_step_per_image"] * args.steps
    ratio = sampling["seconds_per_image"]["hires"] / sampling["seconds_per_image"]["thumbnail"]
    result = {"benchmark": "hires", "machine": info, "profile": profile, "steps": args.steps, "batch_size": args.batch_size,
              "target_ratio": TARGET_RATIO, "ratio": ratio, "target_met": ratio <= TARGET_RATIO, "sampling": sampling,
              "pixel": pixel, "pixel_over_latent": pixel["seconds_per_image"] / sampling["seconds_per_image"]["hires"],
              "unet_parameters": count_parameters(pipes["hires"].unet), "seconds": round(time.perf_counter() - start, 1)}
    table = markdown(result, info)
    print("\n" + table)
    paths = write_result(f"hires_{device.type}", result, table, out_dir(args))
    print(f"wrote {paths[0]} and {paths[1].name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
