"""Latent (16×16×4) against pixel (64×64×3) diffusion: training step time of the same U-Net.

Both denoisers are the course's latent U-Net (unet_preset("latent", <profile>), the network chapter 09 trains), same
widths, same levels, same attention levels; only the input differs: 4×16×16 VAE latents, or the 3×64×64 images those latents encode (the
VAE has f = 4). One step = forward + MSE + backward + AdamW, fp32, one fixed batch; the two are timed interleaved
(latent, pixel, pixel, latent, ...) and we report medians. When the preset has self-attention, a second pair drops it, to
separate the quadratic cost of attention from the linear cost of convolutions. The VAE encoding of the images is
timed too: latent diffusion pays it once per image (chapter 07 caches the latents), not once per step.

    python bench/bench_latent_vs_pixel.py                 # CPU (or CUDA when present)
    python bench/bench_latent_vs_pixel.py --batch-size 32 --repeats 5
    python bench/bench_latent_vs_pixel.py --profile smoke --batch-size 2 --repeats 1 --out-dir /tmp/b   # check that it runs

Target: latent step ≥ 4× faster than the pixel step. Writes bench/results/latent_vs_pixel_<device>.json and .md.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import add_machine_arguments, describe, out_dir, seconds_of, setup, verdict, write_result  # noqa: E402

from ldm_course.benchmarks import BENCHMARK_TARGETS  # noqa: E402
from ldm_course.unet import UNet, count_parameters, unet_preset  # noqa: E402
from ldm_course.vae import build_vae, vae_config  # noqa: E402

TARGET_SPEEDUP = BENCHMARK_TARGETS["latent_vs_pixel"]["speedup"]   # the course's target, shared with the report


def training_step(model: torch.nn.Module, x: torch.Tensor):
    "A closure: one AdamW step of the ε-regression on a fixed batch."
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    t = torch.randint(0, 1000, (len(x),), device=x.device)
    noise = torch.randn_like(x)

    def step():
        loss = F.mse_loss(model(x + noise, t), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def compare(config, batch_size: int, repeats: int, device: torch.device) -> dict:
    "Interleaved timing of the same U-Net on latents and on pixels."
    torch.manual_seed(0)
    shapes = {"latent": (config.in_channels, 16, 16), "pixel": (3, 64, 64)}
    models = {"latent": UNet(config).to(device).train(),
              "pixel": UNet(config.replace(in_channels=3, out_channels=3)).to(device).train()}
    steps = {k: training_step(models[k], torch.randn(batch_size, *shapes[k], device=device)) for k in models}
    for step in steps.values(): seconds_of(step, device)  # warm-up: allocator, oneDNN / cuDNN plans
    times = {k: [] for k in steps}
    for r in range(repeats):
        for k in (list(steps) if r % 2 == 0 else list(steps)[::-1]):
            times[k].append(seconds_of(steps[k], device))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"config": config.to_dict(), "batch_size": batch_size,
            "parameters": {k: count_parameters(m) for k, m in models.items()},
            "input_shape": {k: list(s) for k, s in shapes.items()},
            "seconds_per_step": med, "seconds_raw": times,
            "images_per_s": {k: batch_size / s for k, s in med.items()},
            "speedup": med["pixel"] / med["latent"]}


def vae_encode_cost(profile: str, batch_size: int, device: torch.device) -> dict:
    "Seconds per image of the chapter-07 VAE encoder (architecture of the profile, random weights: same cost)."
    vae = build_vae(vae_config("kl", profile)).to(device).eval()
    size = vae.config.image_size   # the catalogue's resolution for this profile (256×256 on cpu)
    x = torch.randn(batch_size, 3, size, size, device=device)
    with torch.no_grad():
        seconds_of(lambda: vae.encode_latents(x), device)
        seconds = min(seconds_of(lambda: vae.encode_latents(x), device) for _ in range(3))
    return {"seconds_per_image": seconds / batch_size, "latent_shape": list(vae.config.latent_shape), "image_size": size}


def markdown(results: list[dict], encode: dict, info: dict) -> str:
    lines = [f"Latent vs pixel diffusion, training step (forward + backward + AdamW, fp32), {describe(info)}.", "",
             "| U-Net | batch | params (latent / pixel) | latent 16×16×4: s/step | pixel 64×64×3: s/step | latent img/s | pixel img/s | speed-up | target ≥ 4× |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        c = r["config"]
        att = f"attention at levels {tuple(c['attention_levels'])}" + (" + mid" if c["mid_attention"] else "") if c["attention_levels"] or c["mid_attention"] else "no self-attention"
        lines.append(f"| {tuple(c['block_out_channels'])}, {att} | {r['batch_size']} | {r['parameters']['latent'] / 1e6:.2f} M / {r['parameters']['pixel'] / 1e6:.2f} M "
                     f"| {r['seconds_per_step']['latent']:.3f} | {r['seconds_per_step']['pixel']:.3f} "
                     f"| {r['images_per_s']['latent']:.1f} | {r['images_per_s']['pixel']:.1f} | {r['speedup']:.1f}× "
                     f"| {verdict(r['speedup'], TARGET_SPEEDUP)} |")
    lines += ["", f"VAE encoding (paid once per training image, then cached): {1e3 * encode['seconds_per_image']:.1f} ms per image "
                  f"({encode['image_size']}×{encode['image_size']}×3 → {'×'.join(map(str, encode['latent_shape'][1:]))}×{encode['latent_shape'][0]})."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_machine_arguments(p, profile_help="U-Net preset: smoke, cpu or gpu (default: gpu on CUDA, else cpu)",
                          batch_help="default 16 on CPU, 128 on GPU")
    p.add_argument("--repeats", type=int, default=3, help="timed steps per model (median reported)")
    args = p.parse_args(argv)
    device, profile, info = setup(args, cpu_batch=16, gpu_batch=128)
    batch_size = args.batch_size

    start = time.perf_counter()
    config = unet_preset("latent", profile)
    without_attention = config.replace(attention_levels=(), mid_attention=False)
    results = []
    for c in [config] + ([without_attention] if without_attention != config else []):   # a preset without attention: once
        results.append(compare(c, batch_size, args.repeats, device))
        r = results[-1]
        print(f"{tuple(c.block_out_channels)} attention {tuple(c.attention_levels)}: latent {r['seconds_per_step']['latent']:.3f} s/step, "
              f"pixel {r['seconds_per_step']['pixel']:.3f} s/step, speed-up {r['speedup']:.1f}×", flush=True)
    encode = vae_encode_cost(profile, batch_size, device)
    table = markdown(results, encode, info)
    print("\n" + table)
    payload = {"benchmark": "latent_vs_pixel", "machine": info, "profile": profile, "target_speedup": TARGET_SPEEDUP,
               "speedup": results[0]["speedup"], "target_met": results[0]["speedup"] >= TARGET_SPEEDUP,
               "results": results, "vae_encode": encode, "seconds": round(time.perf_counter() - start, 1)}
    paths = write_result(f"latent_vs_pixel_{device.type}", payload, table, out_dir(args))
    print(f"wrote {paths[0]} and {paths[1].name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
