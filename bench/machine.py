"""Shared by the benchmark scripts of bench/: the machine description printed and stored with every result,
timing helpers, and writing a result as JSON + a markdown table under bench/results/.

Not a benchmark itself (run_all.py runs the bench_*.py scripts)."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def cpu_model() -> str:
    "The CPU's marketing name (from /proc/cpuinfo on Linux), else what platform reports."
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"): return line.split(":", 1)[1].strip()
    except OSError: pass
    return platform.processor() or platform.machine()


def machine_record(device: torch.device) -> dict:
    "What the numbers were measured on: CPU model, cores, threads, load, torch version, GPU, date."
    info = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "cpu_model": cpu_model(), "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
            "torch": torch.__version__, "python": platform.python_version(), "device": device.type,
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}
    return info


def describe_device(info: dict) -> str:
    "The device in a few words: the GPU's name, else the CPU model with its cores and torch threads."
    return info["gpu"] or f"{info['cpu_model']} ({info['cpu_cores']} cores, {info['torch_threads']} torch threads)"


def describe(info: dict) -> str:
    "One line for the console and the markdown tables."
    where = describe_device(info)
    load = f", load average {info['load_average_1min']}" if info.get("load_average_1min") is not None else ""
    return f"{where}; torch {info['torch']}, Python {info['python']}; {info['date']}{load}"


def pick_device(name: str | None) -> torch.device:
    "The requested device, else CUDA when present, else the CPU."
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def add_machine_arguments(parser: argparse.ArgumentParser, profile_help: str | None = None, batch_help: str | None = None) -> None:
    "The options every benchmark shares: --device, --threads, --out-dir, and --profile / --batch-size when asked for."
    parser.add_argument("--device", default=None, help="cpu, cuda (default: cuda when present, else cpu)")
    if profile_help: parser.add_argument("--profile", default=None, help=profile_help)
    if batch_help: parser.add_argument("--batch-size", type=int, default=None, help=batch_help)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out-dir", default=None, help="default bench/results")


def setup(args: argparse.Namespace, cpu_batch: int | None = None, gpu_batch: int | None = None,
          ) -> tuple[torch.device, str, dict]:
    "Apply the shared options: (device, profile, machine description); fills args.batch_size and prints the machine."
    device = pick_device(args.device)
    if args.threads: torch.set_num_threads(args.threads)
    profile = getattr(args, "profile", None) or ("gpu" if device.type == "cuda" else "cpu")
    if getattr(args, "batch_size", 0) is None and cpu_batch is not None:
        args.batch_size = gpu_batch if device.type == "cuda" else cpu_batch
    info = machine_record(device)
    print(describe(info), flush=True)
    return device, profile, info


def out_dir(args: argparse.Namespace) -> Path:
    "Where a benchmark writes: --out-dir, else bench/results."
    return Path(args.out_dir) if args.out_dir else RESULTS_DIR


def synchronize(device: torch.device) -> None:
    if device.type == "cuda": torch.cuda.synchronize(device)


def seconds_of(fn: Callable[[], object], device: torch.device, repeats: int = 1) -> float:
    "Wall-clock seconds of `repeats` calls of fn (CUDA synchronised)."
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats): fn()
    synchronize(device)
    return time.perf_counter() - start


def median_seconds(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> tuple[float, list[float]]:
    "Median seconds of one call of fn over `repeats` timed calls, after `warmup` untimed ones; also the raw times."
    for _ in range(warmup): fn()
    times = [seconds_of(fn, device) for _ in range(repeats)]
    return statistics.median(times), times


def strict_fp32() -> None:
    "Turn TF32 off for matmuls and cuDNN convolutions (cuDNN's default is on: an 'fp32' step would outrun the fp32 peak)."
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def matmul_peak(device: torch.device, sizes: tuple[int, ...] = (1024, 2048), repeats: int = 3) -> dict:
    "Measured fp32 matmul throughput of this machine: best GFLOP/s over square sizes (TF32 off on CUDA)."
    strict_fp32()
    best, per_size = 0.0, {}
    for n in sizes:
        a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
        reps = max(1, int(2e10 / (2 * n**3))) if device.type == "cuda" else 1   # enough work per timing on a GPU
        seconds, _ = median_seconds(lambda: [a @ b for _ in range(reps)], device, repeats)
        per_size[n] = 2 * n**3 * reps / seconds / 1e9
        best = max(best, per_size[n])
    return {"gflops": best, "per_size": per_size}


def step_flops(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, target: torch.Tensor | None = None) -> int:
    "FLOPs of forward + MSE backward of model(x, t) against target (default x), counted once; a diffusers output's .sample is used."
    with FlopCounterMode(display=False) as counter:
        out = model(x, t)
        F.mse_loss(getattr(out, "sample", out), x if target is None else target).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def write_result(stem: str, payload: dict, table: str, out_dir: Path = RESULTS_DIR) -> tuple[Path, Path]:
    "Write <stem>.json (payload) and <stem>.md (table) under out_dir; returns both paths."
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    json_path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    md_path.write_text(table, encoding="utf-8")
    return json_path, md_path


def verdict(value: float, target: float, higher_is_better: bool = True) -> str:
    "'met' or 'missed' for a value against its target."
    ok = value >= target if higher_is_better else value <= target
    return "met" if ok else "missed"
