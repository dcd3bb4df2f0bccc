"""Attained GFLOP/s of a U-Net training step, as a fraction of this machine's measured fp32 matmul peak.

FLOPs of one step (forward + backward) are counted by torch.utils.flop_counter.FlopCounterMode (convolutions,
matmuls, attention; elementwise work such as GroupNorm, SiLU and the optimizer is not counted: it is the
"useful" work). The step is timed with its AdamW update (median of repeats), so attained = FLOPs / step time is
what training really gets. The peak is the best fp32 matmul throughput measured on square matrices before and
after the steps; on CUDA both run in true fp32 (TF32 off for matmuls and cuDNN convolutions), so the ratio is
against what this machine can do, not a datasheet.

Variants measured per U-Net: memory format (contiguous, channels_last) and AdamW implementation (foreach, fused).

    python bench/bench_flops.py                       # CPU (or CUDA when present): latent and CIFAR10 U-Nets
    python bench/bench_flops.py --configs latent --batch-size 64 --repeats 5
    python bench/bench_flops.py --configs latent --profile smoke --batch-size 2 --repeats 1 --formats contiguous \
        --optimizers foreach --peak-sizes 256 --out-dir /tmp/b                      # check that it runs (seconds)

Target on CPU: ≥ 35 % of the matmul peak. Writes bench/results/flops_<device>.json and .md.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import add_machine_arguments, describe, matmul_peak, median_seconds, out_dir, setup, step_flops, strict_fp32, verdict, write_result  # noqa: E402

from ldm_course.benchmarks import BENCHMARK_TARGETS  # noqa: E402
from ldm_course.unet import UNet, count_parameters, unet_preset  # noqa: E402

TARGET_FRACTION = BENCHMARK_TARGETS["flops"]["fraction_of_peak"]   # the course's target, shared with the report
INPUTS = {"latent": (4, 16, 16), "cifar10": (3, 32, 32), "mnist": (1, 28, 28)}


def step_closure(model, x, t, optimizer: str):
    "One training step (ε-regression, AdamW) on a fixed batch."
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, **({"fused": True} if optimizer == "fused" else {"foreach": True}))

    def step():
        loss = F.mse_loss(model(x, t), x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def measure(name: str, profile: str, batch_size: int, memory_format: str, optimizer: str, repeats: int, device) -> dict:
    torch.manual_seed(0)
    config = unet_preset(name, profile)
    fmt = torch.channels_last if memory_format == "channels_last" else torch.contiguous_format
    model = UNet(config).to(device).to(memory_format=fmt).train()
    x = torch.randn(batch_size, *INPUTS[name], device=device).to(memory_format=fmt)
    t = torch.randint(0, 1000, (batch_size,), device=device)
    flops = step_flops(model, x, t)
    seconds, raw = median_seconds(step_closure(model, x, t, optimizer), device, repeats, warmup=2)
    return {"config_name": name, "config": config.to_dict(), "parameters": count_parameters(model), "batch_size": batch_size,
            "memory_format": memory_format, "optimizer": optimizer, "gflop_per_step": flops / 1e9,
            "seconds_per_step": seconds, "seconds_raw": raw, "attained_gflops": flops / seconds / 1e9}


def markdown(rows: list[dict], peak: float, info: dict) -> str:
    lines = [f"Attained GFLOP/s of a training step (FLOPs of forward + backward from FlopCounterMode; time includes AdamW), "
             f"against the measured fp32 matmul peak of {peak:.1f} GFLOP/s (true fp32 in both: TF32 off); {describe(info)}.", "",
             "| U-Net | input | batch | memory format | AdamW | GFLOP/step | s/step | attained GFLOP/s | % of peak | target ≥ 35 % |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        shape = INPUTS[r["config_name"]]
        lines.append(f"| {r['config_name']} {tuple(r['config']['block_out_channels'])} ({r['parameters'] / 1e6:.2f} M) "
                     f"| {shape[1]}×{shape[2]}×{shape[0]} | {r['batch_size']} | {r['memory_format']} | {r['optimizer']} "
                     f"| {r['gflop_per_step']:.1f} | {r['seconds_per_step']:.3f} | {r['attained_gflops']:.1f} "
                     f"| {100 * r['fraction_of_peak']:.0f} % | {verdict(r['fraction_of_peak'], TARGET_FRACTION)} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="latent,cifar10", help=f"comma-separated among {list(INPUTS)}")
    add_machine_arguments(p, profile_help="U-Net presets of this profile (default: gpu on CUDA, else cpu)",
                          batch_help="default 32 on CPU, 128 on GPU")
    p.add_argument("--repeats", type=int, default=3, help="timed steps per variant (median reported)")
    p.add_argument("--formats", default="contiguous,channels_last", help="memory formats to try")
    p.add_argument("--optimizers", default="foreach,fused", help="AdamW implementations to try")
    p.add_argument("--peak-sizes", default="1024,2048", help="sizes n of the n×n fp32 matmuls that measure the peak")
    args = p.parse_args(argv)
    peak_sizes = tuple(int(n) for n in args.peak_sizes.split(","))
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in INPUTS]
    if unknown: p.error(f"unknown configs {unknown}; expected some of {list(INPUTS)}")
    device, profile, info = setup(args, cpu_batch=32, gpu_batch=128)
    batch_size = args.batch_size

    start = time.perf_counter()
    strict_fp32()   # step and peak in the same arithmetic: true fp32, no TF32 (NVIDIA's cuDNN default)
    peaks = [matmul_peak(device, peak_sizes)]
    print(f"fp32 matmul peak: {peaks[0]['gflops']:.1f} GFLOP/s", flush=True)
    rows = []
    formats, optimizers = args.formats.split(","), args.optimizers.split(",")
    for bad, allowed, what in ((set(formats) - {"contiguous", "channels_last"}, ("contiguous", "channels_last"), "formats"),
                               (set(optimizers) - {"foreach", "fused"}, ("foreach", "fused"), "optimizers")):
        if bad: p.error(f"unknown {what} {sorted(bad)}; expected some of {list(allowed)}")
    for name in names:
        for fmt in formats:
            for opt in optimizers:
                rows.append(measure(name, profile, batch_size, fmt, opt, args.repeats, device))
                r = rows[-1]
                print(f"{name} {fmt} {opt}: {r['gflop_per_step']:.1f} GFLOP/step, {r['seconds_per_step']:.3f} s/step, "
                      f"{r['attained_gflops']:.1f} GFLOP/s", flush=True)
    peaks.append(matmul_peak(device, peak_sizes))   # the machine may be busier or quieter now: keep the higher peak
    peak = max(p["gflops"] for p in peaks)
    for r in rows: r["fraction_of_peak"] = r["attained_gflops"] / peak
    best = max(rows, key=lambda r: r["fraction_of_peak"])
    table = markdown(rows, peak, info)
    print("\n" + table)
    payload = {"benchmark": "flops", "machine": info, "profile": profile, "matmul_peak_gflops": peak, "peaks": peaks,
               "target_fraction": TARGET_FRACTION, "best": {k: best[k] for k in ("config_name", "memory_format", "optimizer", "attained_gflops", "fraction_of_peak")},
               "target_met": best["fraction_of_peak"] >= TARGET_FRACTION, "results": rows, "seconds": round(time.perf_counter() - start, 1)}
    paths = write_result(f"flops_{device.type}", payload, table, out_dir(args))
    print(f"wrote {paths[0]} and {paths[1].name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
