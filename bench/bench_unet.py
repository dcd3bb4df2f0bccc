"""Training speed of ldm_course's UNet against diffusers' UNet2DModel with the same architecture.

One training step = forward + MSE loss + backward + AdamW step, fp32, on one fixed batch. Both models are built
from the same `UNetConfig` (same block_out_channels, layers per block, attention levels, GroupNorm groups, head size
and FiLM scale-shift, hence the same parameter count), measured in the same process and interleaved
(A B C D, D C B A, ...) so that a slower or busier moment of the machine hits every contender alike; we report
the median images/s over the repeats. Each model runs in each requested memory format (contiguous NCHW and/or
channels_last NHWC); speed-ups are against diffusers in its default (contiguous) format and, in brackets, against
diffusers in the same format.

Roofline: the FLOPs of forward + backward per image are counted for both models (torch.utils.flop_counter; they
match when the architectures do) and the machine's fp32 matmul peak is measured after the timings, so each contender
also gets its attained GFLOP/s and share of the peak. At equal FLOPs no implementation can beat diffusers by more
than peak / (diffusers' attained GFLOP/s): the table states that ceiling next to the ≥ 1.3× target.

    python bench/bench_unet.py                              # CPU (or CUDA when present), 3 configs, both formats
    python bench/bench_unet.py --formats contiguous         # only the default memory format
    python bench/bench_unet.py --compile --configs mnist    # every contender through torch.compile (slow to build)
    python bench/bench_unet.py --configs mnist --batch-size 128 --repeats 9
    python bench/bench_unet.py --configs latent --formats contiguous --compile --compile-modes default,reduce-overhead --trace

With --compile, each contender is also timed through torch.compile, beside its eager self (--compile-modes adds
torch.compile's other modes, e.g. reduce-overhead, which replays CUDA graphs). With --trace, a few more steps of each
contender run under torch.profiler: wall time, CUDA kernels launched and GPU-busy time per step say whether a step
waits on the GPU or on the Python/launch side (on the CPU: aten operators per step).

Writes bench/results/unet_<device>[_<n>threads][_compile][_trace].json and .md, and prints the table.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ldm_course.unet import UNet, UNetConfig, count_parameters, unet_preset  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import add_machine_arguments, describe_device, matmul_peak, out_dir, setup, step_flops, write_result  # noqa: E402

# The three inputs of the course (28×28×1 MNIST, 32×32×3 CIFAR10, 16×16×4 VAE latents); the networks are chapter 03's
# presets of the run profile, the ones chapters 05, 06 and 09 train (before their class or text inputs are added).
SHAPES = {"mnist": (1, 28, 28), "cifar10": (3, 32, 32), "latent": (4, 16, 16)}


def diffusers_unet(c: UNetConfig):
    "diffusers' UNet2DModel with the architecture of UNet(c)."
    from diffusers import UNet2DModel
    levels = range(c.num_levels)
    return UNet2DModel(
        in_channels=c.in_channels, out_channels=c.out_channels, block_out_channels=c.block_out_channels,
        layers_per_block=c.layers_per_block, norm_num_groups=c.norm_num_groups, attn_norm_num_groups=c.norm_num_groups,
        norm_eps=c.norm_eps, attention_head_dim=c.attention_head_dim, add_attention=c.mid_attention,
        resnet_time_scale_shift="scale_shift", dropout=c.dropout,
        down_block_types=tuple("AttnDownBlock2D" if i in c.attention_levels else "DownBlock2D" for i in levels),
        up_block_types=tuple("AttnUpBlock2D" if i in c.attention_levels else "UpBlock2D" for i in reversed(levels)))


FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")   # torch.compile's modes


def make_step(model: torch.nn.Module, batch: tuple, returns_dict: bool, mode: str = "eager"):
    "A closure running one optimisation step of `model` on `batch`; mode 'eager', 'compile' or 'compile-<torch.compile mode>'."
    x, t, target = batch
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    compile_mode = _compile_mode(mode)
    forward = model if compile_mode is None else torch.compile(model, mode=compile_mode)
    graphs = compile_mode == "reduce-overhead"   # CUDA graphs: each step is a new iteration of the replayed graph

    def step():
        if graphs: torch.compiler.cudagraph_mark_step_begin()
        out = forward(x, t)
        loss = F.mse_loss(out.sample if returns_dict else out, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def dynamo_graphs(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, **kwargs) -> dict:
    "How torch.compile's front end (dynamo) splits a forward: graphs, graph breaks and their reasons, FX ops traced."
    explanation = torch._dynamo.explain(model)(x, t, **kwargs)
    torch._dynamo.reset()  # leave no traced state to the timed contenders
    return {"graphs": explanation.graph_count, "graph_breaks": explanation.graph_break_count, "fx_ops": explanation.op_count,
            "break_reasons": [b.reason for b in explanation.break_reasons]}


def _compile_mode(mode: str) -> str | None:
    "torch.compile's mode of a contender's mode ('compile' is torch.compile's default), None when eager."
    if mode == "eager": return None
    return "default" if mode == "compile" else mode.removeprefix("compile-")


def _mode_name(compile_mode: str) -> str:
    "A contender's mode from torch.compile's mode: 'compile' for the default, else 'compile-<mode>'."
    return "compile" if compile_mode == "default" else f"compile-{compile_mode}"


def _kernel_busy_us(intervals: list[tuple[float, float]]) -> float:
    "Microseconds covered by the union of [start, end) intervals: overlapping kernels count once."
    busy, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end: continue
        busy += b - max(a, end)
        end = b
    return busy


def trace_steps(step, n_steps: int, device: torch.device, top: int = 5) -> dict:
    "One profiled run of n_steps calls of step: wall, operators, and on CUDA kernels launched and GPU-busy time, per step."
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    step()  # outside the trace: the profiler's own start-up must not land on the first step
    if device.type == "cuda": torch.cuda.synchronize(device)
    with profile(activities=activities) as prof:
        wall = timed(step, n_steps, device)
    events = prof.events()
    # GPU-side ranges of profiler annotations (e.g. "Optimizer.step#AdamW.step") span many kernels: not kernels themselves
    kernels = [e for e in events if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]
    is_aten = lambda e: e is not None and e.name.startswith("aten::")
    ops = [e for e in events if e.device_type == DeviceType.CPU and is_aten(e) and not is_aten(e.cpu_parent)]  # dispatched ones
    per_kernel: dict[str, float] = {}
    for k in kernels: per_kernel[k.name] = per_kernel.get(k.name, 0.0) + k.time_range.elapsed_us()
    cpu_rows = [e for e in prof.key_averages() if e.device_type == DeviceType.CPU and not getattr(e, "is_user_annotation", False)]
    result = {"steps": n_steps, "wall_ms_per_step": 1e3 * wall / n_steps, "aten_ops_per_step": len(ops) / n_steps,
              "kernels_per_step": len(kernels) / n_steps,
              "cpu_self_ms_per_step": sum(e.self_cpu_time_total for e in cpu_rows) / 1e3 / n_steps,
              "top_cpu": [{"name": e.key[:120], "calls_per_step": e.count / n_steps, "self_ms_per_step": e.self_cpu_time_total / 1e3 / n_steps}
                          for e in sorted(cpu_rows, key=lambda e: -e.self_cpu_time_total)[:top]]}
    if device.type == "cuda":
        busy = _kernel_busy_us([(k.time_range.start, k.time_range.end) for k in kernels])
        result.update(gpu_busy_ms_per_step=busy / 1e3 / n_steps, gpu_busy_fraction=busy / 1e6 / wall,
                      top_kernels=[{"name": name[:120], "ms_per_step": us / 1e3 / n_steps}
                                   for name, us in sorted(per_kernel.items(), key=lambda kv: -kv[1])[:top]])
    return result


def timed(step, n_steps: int, device: torch.device) -> float:
    "Seconds taken by n_steps calls of step (synchronising CUDA)."
    if device.type == "cuda": torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(n_steps): step()
    if device.type == "cuda": torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _label(model_name: str, fmt: str, mode: str) -> str:
    "Contender name: 'ours channels_last', 'ours channels_last compile' or 'ours contiguous compile-reduce-overhead'."
    return f"{model_name} {fmt}" + ("" if mode == "eager" else f" {mode}")


def _parse_label(label: str) -> tuple[str, str, str]:
    "(model, memory format, 'eager' | 'compile' | 'compile-<mode>') from a contender name."
    words = label.split()
    return words[0], words[1], words[2] if len(words) > 2 else "eager"


def bench_config(name: str, args, device: torch.device, profile: str = "cpu") -> dict:
    "Interleaved timing of every (model, memory format) contender on one configuration (chapter 03's preset of `profile`)."
    shape, config = SHAPES[name], unet_preset(name, profile)
    builders = {"ours": lambda: UNet(config), "diffusers": lambda: diffusers_unet(config)}
    x = torch.randn(args.batch_size, *shape, device=device)
    t, target = torch.randint(0, 1000, (args.batch_size,), device=device), torch.randn_like(x)
    steps, parameters, flops, graphs = {}, {}, {}, {}
    modes = ("eager", *map(_mode_name, args.compile_modes)) if args.compile else ("eager",)  # compiled beside eager
    for model_name, build in builders.items():
        for fmt in args.formats:
            for mode in modes:
                torch.manual_seed(0)  # same initial weights in every format
                model = build().to(device=device, memory_format=FORMATS[fmt]).train()
                parameters[model_name] = count_parameters(model)
                batch = tuple(v.to(memory_format=FORMATS[fmt]) for v in (x, t, target)[::2])
                if model_name not in flops: flops[model_name] = step_flops(model, batch[0], t, batch[1]) / len(x)  # per image; elementwise work not counted
                if mode != "eager" and model_name not in graphs: graphs[model_name] = dynamo_graphs(model, batch[0], t)
                steps[_label(model_name, fmt, mode)] = make_step(model, (batch[0], t, batch[1]), model_name == "diffusers", mode)
    compile_seconds = {}
    for label, step in steps.items():  # warm-up: allocator, oneDNN/cuDNN plans, compilation
        compile_seconds[label] = timed(step, args.warmup, device)
    seconds = {label: [] for label in steps}
    order = list(steps)
    for r in range(args.repeats):
        for label in (order if r % 2 == 0 else order[::-1]):  # A B C D, D C B A: no contender always goes first
            seconds[label].append(timed(steps[label], args.steps, device))
    images = args.batch_size * args.steps
    timings = {}
    for label, s in seconds.items():
        rates = [images / v for v in s]
        timings[label] = {"images_per_s_median": statistics.median(rates), "images_per_s_min": min(rates),
                          "images_per_s_max": max(rates), "seconds": s, "warmup_seconds": compile_seconds[label]}
    baseline = timings[_label("diffusers", args.formats[0], "eager")]["images_per_s_median"]
    for label, tm in timings.items():
        _, fmt, mode = _parse_label(label)
        tm["speedup_vs_diffusers_default"] = tm["images_per_s_median"] / baseline
        tm["speedup_vs_diffusers_same_format"] = (tm["images_per_s_median"] /
                                                  timings[_label("diffusers", fmt, mode)]["images_per_s_median"])
    for label, tm in timings.items():
        tm["gflops_attained"] = tm["images_per_s_median"] * flops[_parse_label(label)[0]] / 1e9
    if args.trace:  # after the timings, so the profiler cannot slow them down
        for label, step in steps.items():
            try: timings[label]["trace"] = trace_steps(step, max(args.steps, 3), device)
            except Exception as e:  # a profiler failure must not lose the timings
                timings[label]["trace"] = {"error": f"{type(e).__name__}: {e}"}
                print(f"trace of {label} failed: {e}", file=sys.stderr)
    return {"name": name, "input_shape": list(shape), "config": config.to_dict(), "parameters": parameters,
            "gflop_per_image": {k: v / 1e9 for k, v in flops.items()}, "timings": timings,
            **({"dynamo": graphs} if graphs else {})}


def add_roofline(results: list[dict], peak_gflops: float, baseline_format: str) -> None:
    "Share of the matmul peak of every contender, and the largest speed-up over diffusers that equal FLOPs allow."
    for r in results:
        for tm in r["timings"].values(): tm["fraction_of_peak"] = tm["gflops_attained"] / peak_gflops
        baseline = r["timings"][_label("diffusers", baseline_format, "eager")]
        r["speedup_ceiling"] = peak_gflops / baseline["gflops_attained"]


def markdown_table(results: list[dict], meta: dict) -> str:
    "One row per (config, contender); speed-ups against diffusers' first format and (same format)."
    lines = [f"Training images/s (forward + backward + AdamW, fp32, batch {meta['batch_size']}), {meta['device_name']}, "
             f"{meta['threads']} threads, torch.compile {meta['compile']}; median of {meta['repeats']} interleaved "
             f"repeats of {meta['steps']} steps (min–max in brackets); speed-up against diffusers "
             f"{meta['formats'][0]} eager (against diffusers in the same format and mode). Load average "
             f"{meta['load_average_start'][0]:.1f} at the start, {meta['load_average_end'][0]:.1f} at the end; "
             f"torch {meta['torch']}, diffusers {meta['diffusers']}.", "",
             "| config | input | params (ours = diffusers) | model | memory format | img/s | speed-up | GFLOP/s | % of peak |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        c, p = r["config"], r["parameters"]
        same = "=" if p["ours"] == p["diffusers"] else f"≠ {p['diffusers'] / 1e6:.3f} M"
        head = (f"| {r['name']} {tuple(c['block_out_channels'])}, attention {tuple(c['attention_levels'])} + mid "
                f"| {'×'.join(map(str, r['input_shape'][1:]))}×{r['input_shape'][0]} | {p['ours'] / 1e6:.3f} M {same} ")
        for i, (label, tm) in enumerate(r["timings"].items()):
            model_name, fmt, mode = _parse_label(label)
            if mode != "eager": fmt += " + torch.compile" + ("" if mode == "compile" else f" ({_compile_mode(mode)})")
            lines.append((head if i == 0 else "| | | ") +
                         f"| {model_name} | {fmt} | {tm['images_per_s_median']:.1f} "
                         f"({tm['images_per_s_min']:.0f}–{tm['images_per_s_max']:.0f}) "
                         f"| {tm['speedup_vs_diffusers_default']:.2f}× ({tm['speedup_vs_diffusers_same_format']:.2f}×) "
                         f"| {tm['gflops_attained']:.1f} | {100 * tm['fraction_of_peak']:.0f} % |")
    lines += ["", f"Roofline: fp32 matmul peak {meta['matmul_peak_gflops']:.1f} GFLOP/s, measured after the timings; FLOPs per image "
              "(forward + backward) counted by torch.utils.flop_counter. At equal FLOPs, the largest possible speed-up over "
              "diffusers " + meta["formats"][0] + " eager is peak / its attained GFLOP/s: " +
              ", ".join(f"{r['name']} {r['speedup_ceiling']:.2f}×" for r in results) + " (target ≥ 1.3×)."
              + (" On CUDA, convolutions may use TF32 (cuDNN's default) while the peak is true fp32." if meta["device"] == "cuda" else "")]
    traced = [r for r in results if "dynamo" in r]   # with --compile: a graph break would leave part of the forward eager
    if traced: lines.append("")
    for r in traced:
        lines.append(f"torch.compile front end, {r['name']}: " + "; ".join(
            f"{m} {g['graphs']} graph(s), {g['graph_breaks']} break(s), {g['fx_ops']} FX ops" for m, g in r["dynamo"].items()) + ".")
    return "\n".join(lines + trace_table(results, meta)) + "\n"


def trace_table(results: list[dict], meta: dict) -> list[str]:
    "Markdown lines of the --trace section: where each contender's step time goes (empty without traces)."
    rows = [(r["name"], label, tm["trace"]) for r in results for label, tm in r["timings"].items() if "trace" in tm]
    if not rows: return []
    cuda = meta["device"] == "cuda"
    lines = ["", "torch.profiler, one traced run per contender after the timings (the profiler adds its own overhead): "
             + ("per training step, wall time, CPU time of the traced threads (self time summed over operators, and the largest), CUDA kernels launched, time the GPU runs at least one kernel (union of kernel "
                "intervals), and that time over the wall time; a step whose GPU is busy a small part of its wall time waits on "
                "Python and kernel launches, not on the GPU." if cuda else "per training step, wall time, CPU time of the traced threads (self time summed over operators, and the largest) and aten operators dispatched (not counting those an operator calls)."), "",
             "| config | contender | wall ms/step | CPU ms/step (top operator) | " + ("kernels/step | GPU-busy ms/step | GPU busy | top kernel |" if cuda else "aten ops/step |"),
             "|---|---|---|---|" + ("---|---|---|---|" if cuda else "---|")]
    for name, label, tr in rows:
        if "error" in tr:
            lines.append(f"| {name} | {label} | trace failed: {tr['error'][:80]} | |" + (" | | | |" if cuda else " |")); continue
        top_cpu = tr["top_cpu"][0] if tr.get("top_cpu") else {"name": "–", "self_ms_per_step": 0.0}
        cells = (f"| {name} | {label} | {tr['wall_ms_per_step']:.2f} | {tr['cpu_self_ms_per_step']:.2f} "
                 f"({top_cpu['name'][:40]}: {top_cpu['self_ms_per_step']:.2f}) | ")
        if cuda:
            top = tr["top_kernels"][0] if tr.get("top_kernels") else {"name": "–", "ms_per_step": 0.0}
            cells += (f"{tr['kernels_per_step']:.0f} | {tr['gpu_busy_ms_per_step']:.2f} | {100 * tr['gpu_busy_fraction']:.0f} % "
                      f"| {top['name'][:50]} ({top['ms_per_step']:.2f} ms) |")
        else: cells += f"{tr['aten_ops_per_step']:.0f} |"
        lines.append(cells)
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default=",".join(SHAPES), help=f"comma-separated, among {list(SHAPES)}")
    p.add_argument("--formats", default="contiguous,channels_last", help=f"comma-separated, among {list(FORMATS)}")
    add_machine_arguments(p, profile_help="U-Net presets of this profile (default: gpu on CUDA, else cpu)",
                          batch_help="default 32 on CPU, 128 on GPU")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per contender (median reported)")
    p.add_argument("--steps", type=int, default=2, help="training steps per repeat")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per contender before timing")
    p.add_argument("--compile", action="store_true", help="also time every contender through torch.compile")
    p.add_argument("--compile-modes", default="default",
                   help=f"with --compile: comma-separated torch.compile modes, among {list(COMPILE_MODES)} (default: default)")
    p.add_argument("--trace", action="store_true", help="also profile a few steps of every contender with torch.profiler")
    args = p.parse_args(argv)
    device, profile, info = setup(args, cpu_batch=32, gpu_batch=128)
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    args.formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    args.compile_modes = [m.strip() for m in args.compile_modes.split(",") if m.strip()]
    unknown = ([n for n in names if n not in SHAPES] + [f for f in args.formats if f not in FORMATS]
               + [m for m in args.compile_modes if m not in COMPILE_MODES])
    if unknown: p.error(f"unknown configs, formats or compile modes {unknown}; expected configs among {list(SHAPES)}, "
                        f"formats among {list(FORMATS)}, compile modes among {list(COMPILE_MODES)}")

    import diffusers
    meta = {"device": device.type, "profile": profile, "threads": torch.get_num_threads(), "batch_size": args.batch_size,
            "repeats": args.repeats, "steps": args.steps, "warmup": args.warmup, "compile": args.compile,
            "compile_modes": args.compile_modes if args.compile else [], "trace": args.trace,
            "formats": args.formats, "load_average_start": os.getloadavg(),
            "device_name": describe_device(info), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "command": " ".join(["bench/bench_unet.py", *(sys.argv[1:] if argv is None else argv)])}
    results = []
    for name in names:
        start = time.perf_counter()
        r = bench_config(name, args, device, profile)
        results.append(r)
        rates = ", ".join(f"{label} {tm['images_per_s_median']:.1f}" for label, tm in r["timings"].items())
        print(f"{name}: params ours {r['parameters']['ours']:,d} / diffusers {r['parameters']['diffusers']:,d}; "
              f"img/s: {rates} ({time.perf_counter() - start:.0f} s)", flush=True)

    meta["load_average_end"] = os.getloadavg()
    peak = matmul_peak(device)  # after the timings: it turns TF32 off on CUDA, which must not change the contenders
    meta["matmul_peak_gflops"], meta["matmul_peak"] = peak["gflops"], peak
    add_roofline(results, peak["gflops"], args.formats[0])
    table = markdown_table(results, meta)
    print("\n" + table)
    stem = f"unet_{device.type}" + (f"_{args.threads}threads" if args.threads else "") + ("_compile" if args.compile else "") + ("_trace" if args.trace else "")
    paths = write_result(stem, {"benchmark": "unet", "machine": info, "meta": meta, "results": results}, table, out_dir(args))
    print(f"wrote {paths[0]} and {paths[1].name}")


if __name__ == "__main__":
    main()
