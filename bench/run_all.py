"""Run every benchmark of bench/ and gather their results in bench/results/summary.md and summary.json.

Each bench_*.py script runs in its own process (so one crash or one slow script does not stop the others), on the
default device (CUDA when present, else CPU), and writes its own <name>_<device>.json / .md under bench/results/.
This script then reads every result file there, CPU and CUDA alike, and writes one summary: the machine, each
benchmark's headline number against its target, and each benchmark's full table.

    python bench/run_all.py                   # all benchmarks
    python bench/run_all.py --only flops,sampling --timeout 600
    python bench/run_all.py --summary-only    # rebuild the summary from the result files already there
    python bench/run_all.py --quick           # tiny sizes, to check every script runs (~1 min); writes to a temp folder

Benchmarks and targets:
  bench_unet.py            U-Net training images/s, ours vs diffusers UNet2DModel (same architecture): ≥ 1.3×
  bench_sampling.py        DDIM-50 vs DDPM-1000 on the same latent model: ≥ 18× faster, ≤ 3 points of prompt accuracy lost
  bench_solvers.py         DDIM and DPM-Solver++ from 5 to 50 steps vs DDPM-1000: ≤ 3 points lost within 15 steps, resolved
  bench_latent_vs_pixel.py training step on 16×16×4 latents vs 64×64×3 pixels, same U-Net: ≥ 4× faster
  bench_hires.py           sampling time per image at 256×256 vs 64×64 through the same 16×16 latent: ≤ 1.5×
  bench_flops.py           attained GFLOP/s of a training step / measured fp32 matmul peak: ≥ 35 % on CPU
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
from machine import RESULTS_DIR, describe, machine_record, pick_device  # noqa: E402

from ldm_course.benchmarks import BENCHMARK_TARGETS, unet_speedups  # noqa: E402  (the targets and U-Net rule the report judges with)

SCRIPTS = {"unet": "bench_unet.py", "sampling": "bench_sampling.py", "solvers": "bench_solvers.py", "latent_vs_pixel": "bench_latent_vs_pixel.py",
           "hires": "bench_hires.py", "flops": "bench_flops.py"}
QUICK_ARGS = {  # the tiniest settings of each script: they check that it runs, their numbers mean nothing
    "unet": ["--configs", "mnist", "--formats", "contiguous", "--batch-size", "2", "--repeats", "1", "--steps", "1", "--warmup", "1"],
    "sampling": ["--profile", "smoke", "--num-images", "2", "--ddim-steps", "5", "--ddpm-steps", "20"],
    "solvers": ["--profile", "smoke", "--num-images", "2", "--steps", "2", "3", "--ddpm-steps", "20"],
    "latent_vs_pixel": ["--profile", "smoke", "--batch-size", "2", "--repeats", "1"],
    "hires": ["--profile", "smoke", "--batch-size", "2", "--repeats", "1", "--steps", "2"],
    "flops": ["--configs", "latent", "--profile", "smoke", "--batch-size", "2", "--repeats", "1", "--formats", "contiguous",
              "--optimizers", "foreach", "--peak-sizes", "256"],
}
QUICK_DIR = Path("/tmp/ldm_course_bench_quick")
MISSING_INPUTS = 2  # exit status of a script that found nothing to measure (e.g. no trained pipeline): reported, not a crash
TITLES = {"unet": "U-Net training speed: ours vs diffusers", "sampling": "Sampling: DDIM-50 vs DDPM-1000",
          "solvers": "Samplers against the number of steps: DPM-Solver++ vs DDPM-1000",
          "latent_vs_pixel": "Latent vs pixel diffusion: training step",
          "hires": "High resolution through the same latent: sampling time", "flops": "Attained FLOP/s of a training step"}


def run_script(name: str, timeout: float, extra: list[str]) -> dict:
    "Run one benchmark script; returns its exit status, wall time and the tail of its output."
    start = time.perf_counter()
    cmd = [sys.executable, str(BENCH_DIR / SCRIPTS[name]), *extra]
    print(f"\n=== {' '.join(cmd[1:])}", flush=True)
    try:
        proc = subprocess.run(cmd, cwd=BENCH_DIR.parent, capture_output=True, text=True, timeout=timeout)
        status, output = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        out = e.stdout or ""
        status, output = "timeout", out.decode(errors="replace") if isinstance(out, bytes) else out
    seconds = time.perf_counter() - start
    print(output[-3000:], flush=True)
    verdict = "ok" if status == 0 else "nothing to measure" if status == MISSING_INPUTS else f"FAILED ({status})"
    print(f"=== {name}: {verdict} in {seconds:.0f} s", flush=True)
    return {"script": SCRIPTS[name], "status": status, "seconds": round(seconds, 1), "output_tail": output[-2000:]}


def headline(name: str, result: dict) -> tuple[str, str]:
    "(measured, target and verdict) in one line each, from a result file."
    if name == "unet":
        rows = unet_speedups(result)   # the report's rule: our fastest variant over diffusers' fastest
        target = BENCHMARK_TARGETS["unet"]["speedup"]
        ceiling = lambda r: f", ceiling at equal FLOPs {r['ceiling']:.2f}×" if r["ceiling"] is not None else ""  # roofline, see bench_unet.py
        parts = [f"{r['name']}: {r['ours_ips']:.1f} img/s ({r['ours']}) vs {r['base_ips']:.1f} ({r['base']}), {r['speedup']:.2f}×{ceiling(r)}"
                 for r in rows]
        return "; ".join(parts), f"≥ {target:g}× (best of ours vs best of diffusers): {'met' if min(r['speedup'] for r in rows) >= target else 'missed'}"
    if name == "sampling":
        met = result["target_met"]
        return (f"{result['speedup']:.1f}× faster; accuracy lost {100 * result['accuracy_loss']:+.1f} ± "
                f"{100 * result['accuracy_loss_std_error']:.1f} points (N = {result['num_images']}); FID DDIM − DDPM "
                f"{result['fid_difference']:+.2f}",
                f"≥ 18×: {'met' if met['speedup'] else 'missed'}; ≤ 3 points: {'met' if met['accuracy_loss'] else 'missed'}")
    if name == "latent_vs_pixel":
        return f"{result['speedup']:.1f}× faster per step", f"≥ 4×: {'met' if result['target_met'] else 'missed'}"
    if name == "solvers":
        v, t = result["verdict"], BENCHMARK_TARGETS["solvers"]
        measured = "no DPM-Solver++ point within the step budget" if not v.get("point") else \
            f"best {v['point']}: {100 * v['loss']:+.1f} ± {100 * v['std_error']:.1f} points lost vs DDPM-{result['reference']['steps']} (N = {result['num_images']})"
        return measured, f"≤ {100 * t['accuracy_loss']:g} points within {t['max_evaluations']:g} steps, resolved: " + \
            ("not measured" if v.get("met") is None else "met" if v["met"] else "missed")
    if name == "hires":
        s = result["sampling"]["seconds_per_image"]
        target = BENCHMARK_TARGETS["hires"]["ratio"]
        return (f"{result['ratio']:.2f}× ({s['hires']:.3f} vs {s['thumbnail']:.3f} s per image); pixel-space U-Net "
                f"{result['pixel_over_latent']:.0f}× the latent pipeline", f"≤ {target:g}×: {'met' if result['ratio'] <= target else 'missed'}")
    if name == "flops":
        b = result["best"]
        return (f"{b['attained_gflops']:.1f} GFLOP/s = {100 * b['fraction_of_peak']:.0f} % of {result['matmul_peak_gflops']:.1f} "
                f"(best: {b['config_name']}, {b['memory_format']}, AdamW {b['optimizer']})",
                f"≥ 35 % on CPU: {'met' if result['target_met'] else 'missed'}" if result["machine"]["device"] == "cpu" else "(CPU target only)")
    return "", ""


def result_files(out_dir: Path) -> dict[str, list[Path]]:
    "Result JSON files per benchmark (every device, every variant)."
    prefix = {"unet": "unet_", "sampling": "sampling_", "solvers": "solvers_", "latent_vs_pixel": "latent_vs_pixel_", "hires": "hires_", "flops": "flops_"}
    return {name: sorted(out_dir.glob(f"{p}*.json")) for name, p in prefix.items()}


def summarise(out_dir: Path, runs: dict, info: dict) -> tuple[str, dict]:
    "The markdown summary and its JSON twin."
    files = result_files(out_dir)
    lines = ["# Benchmarks of ldm_course", "", f"Summary written by `bench/run_all.py` on {describe(info)}.",
             "Each benchmark records the machine it ran on (below each table); the CPU is shared with other work when "
             "the load average is high, which slows every number down.", "",
             "| benchmark | result file | measured | target |", "|---|---|---|---|"]
    summary = {"machine": info, "runs": runs, "benchmarks": {}}
    for name, paths in files.items():
        if not paths:
            run = runs.get(name, {})
            why = "" if not run else (f" ({run['output_tail'].strip().splitlines()[-1]})" if run["status"] == MISSING_INPUTS and run["output_tail"].strip()
                                      else f" (run status: {run['status']})")
            lines.append(f"| {TITLES[name]} | — | not measured{why} | |")
            continue
        for path in paths:
            result = json.loads(path.read_text(encoding="utf-8"))
            measured, target = headline(name, result)
            lines.append(f"| {TITLES[name]} | `{path.name}` | {measured} | {target} |")
            summary["benchmarks"].setdefault(name, []).append({"file": path.name, "measured": measured, "target": target})
    for name, paths in files.items():
        for path in paths:
            md = path.with_suffix(".md")
            if md.is_file(): lines += ["", f"## {TITLES[name]} (`{md.name}`)", "", md.read_text(encoding="utf-8").strip()]
    failed = {k: v for k, v in runs.items() if v["status"] not in (0, MISSING_INPUTS)}
    if failed:
        lines += ["", "## Runs that failed", ""]
        lines += [f"- `{v['script']}`: status {v['status']} after {v['seconds']} s; last output:\n\n```\n{v['output_tail'][-800:]}\n```" for v in failed.values()]
    return "\n".join(lines) + "\n", summary


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default=",".join(SCRIPTS), help=f"comma-separated among {list(SCRIPTS)}")
    p.add_argument("--timeout", type=float, default=600, help="seconds allowed per benchmark script")
    p.add_argument("--summary-only", action="store_true", help="do not run anything: rebuild the summary from bench/results")
    p.add_argument("--quick", action="store_true",
                   help=f"tiniest settings, to check the scripts run; results go to {QUICK_DIR} unless --out-dir is given")
    p.add_argument("--out-dir", default=None, help="default bench/results")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCRIPTS]
    if unknown: p.error(f"unknown benchmarks {unknown}; expected some of {list(SCRIPTS)}")
    out_dir = Path(args.out_dir) if args.out_dir else QUICK_DIR if args.quick else RESULTS_DIR
    info = machine_record(pick_device(None))
    print(describe(info), flush=True)
    runs = {}
    if not args.summary_only:
        for name in names:
            extra = ["--out-dir", str(out_dir), *(QUICK_ARGS[name] if args.quick else [])]
            runs[name] = run_script(name, args.timeout, extra)
    markdown, summary = summarise(out_dir, runs, info)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.md").write_text(markdown, encoding="utf-8")
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"\nwrote {out_dir / 'summary.md'} and summary.json")
    return 0 if all(r["status"] in (0, MISSING_INPUTS) for r in runs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
