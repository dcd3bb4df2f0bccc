"""The benchmark scripts of bench/ run end to end with their tiniest settings and write the JSON and markdown that
bench/run_all.py summarises. These tests check that the scripts work, not the numbers (the lead measures those on
an idle machine); each fails if a script crashes, writes nothing, or writes a file run_all.py cannot read."""
from __future__ import annotations

import importlib
import json
import re
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"


def bench_module(name: str):
    "Import bench/<name>.py as a module (the scripts import their sibling machine.py)."
    if str(BENCH) not in sys.path: sys.path.insert(0, str(BENCH))
    return importlib.import_module(name)


@pytest.fixture(scope="module")
def results(tmp_path_factory, one_thread):
    "Run bench_flops, bench_latent_vs_pixel and bench_hires once with the tiniest settings; their output folder."
    out = tmp_path_factory.mktemp("bench")
    flops = bench_module("bench_flops").main(["--device", "cpu", "--configs", "latent", "--profile", "smoke", "--batch-size", "2",
                                              "--repeats", "1", "--formats", "contiguous", "--optimizers", "foreach",
                                              "--peak-sizes", "128", "--out-dir", str(out)])
    latent = bench_module("bench_latent_vs_pixel").main(["--device", "cpu", "--profile", "smoke", "--batch-size", "2",
                                                         "--repeats", "1", "--out-dir", str(out)])
    hires = bench_module("bench_hires").main(["--device", "cpu", "--profile", "smoke", "--batch-size", "2", "--repeats", "1",
                                              "--steps", "2", "--out-dir", str(out)])
    assert (flops, latent, hires) == (0, 0, 0)
    return out


def test_hires_benchmark_times_both_resolutions_through_the_same_latent(results):
    "Issue 16's LDM thesis benchmark: the same U-Net and latent, two decoders, and the pixel-space reference."
    r = json.loads((results / "hires_cpu.json").read_text())
    assert r["benchmark"] == "hires" and r["target_ratio"] == 1.5
    s = r["sampling"]
    assert s["image_size"]["thumbnail"] == 64 and s["downsample_factor"]["thumbnail"] == 4
    assert r["ratio"] == pytest.approx(s["seconds_per_image"]["hires"] / s["seconds_per_image"]["thumbnail"])
    assert r["target_met"] == (r["ratio"] <= 1.5)
    assert r["pixel"]["input_shape"] == [3, s["image_size"]["hires"], s["image_size"]["hires"]]
    assert r["pixel"]["seconds_per_image"] == pytest.approx(r["pixel"]["seconds_per_step_per_image"] * r["steps"])
    from ldm_course.benchmarks import benchmark_verdicts
    assert benchmark_verdicts("hires", r) == [r["target_met"]]
    assert "ratio to 64×64" in (results / "hires_cpu.md").read_text()


def test_flops_benchmark_writes_attained_gflops_against_the_measured_peak(results):
    r = json.loads((results / "flops_cpu.json").read_text())
    assert r["benchmark"] == "flops" and r["machine"]["device"] == "cpu" and r["matmul_peak_gflops"] > 0
    assert len(r["results"]) == 1   # one config × one format × one optimizer
    row = r["results"][0]
    assert row["gflop_per_step"] > 0 and row["seconds_per_step"] > 0
    assert row["attained_gflops"] == pytest.approx(row["gflop_per_step"] / row["seconds_per_step"])
    assert row["fraction_of_peak"] == pytest.approx(row["attained_gflops"] / r["matmul_peak_gflops"])
    assert r["target_met"] == (r["best"]["fraction_of_peak"] >= 0.35)
    md = (results / "flops_cpu.md").read_text()
    assert "% of peak" in md and md.count("\n| latent") == 1


def test_flop_count_of_a_step_is_forward_plus_backward():
    "FlopCounterMode on a conv net: the backward costs about twice the forward (grads of inputs and of weights)."
    flops = bench_module("bench_flops")
    from torch.utils.flop_counter import FlopCounterMode
    net = torch.nn.Conv2d(4, 8, 3, padding=1)
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    with FlopCounterMode(display=False) as fwd: net(x)
    forward = fwd.get_total_flops()
    assert forward == 2 * 2 * 8 * 8 * 8 * 4 * 9   # 2 FLOPs per multiply-add

    class Model(torch.nn.Module):   # the (x, t) signature of the U-Nets
        def __init__(self): super().__init__(); self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)
        def forward(self, x, t): return self.conv(x)
    model, x4 = Model(), torch.randn(2, 4, 8, 8)
    step = flops.step_flops(model, x4, torch.zeros(2, dtype=torch.long))
    one_forward = 2 * 2 * 8 * 8 * 4 * 4 * 9
    assert step == 2 * one_forward   # x4 needs no grad: forward + weight gradient only


def test_latent_vs_pixel_benchmark_times_both_inputs_with_and_without_attention(results):
    r = json.loads((results / "latent_vs_pixel_cpu.json").read_text())
    first = r["results"][0]
    has_attention = bool(first["config"]["attention_levels"] or first["config"]["mid_attention"])
    assert r["benchmark"] == "latent_vs_pixel" and len(r["results"]) == 1 + has_attention   # no pair timed twice
    assert first["input_shape"] == {"latent": [4, 16, 16], "pixel": [3, 64, 64]}
    assert first["speedup"] == pytest.approx(first["seconds_per_step"]["pixel"] / first["seconds_per_step"]["latent"])
    assert r["speedup"] == first["speedup"] and r["target_met"] == (r["speedup"] >= 4)
    assert not r["results"][-1]["config"]["attention_levels"] and not r["results"][-1]["config"]["mid_attention"]
    assert r["vae_encode"]["seconds_per_image"] > 0
    assert "speed-up" in (results / "latent_vs_pixel_cpu.md").read_text()


@pytest.mark.parametrize("script", ["bench_sampling", "bench_solvers"])
def test_sampling_benchmarks_say_what_is_missing_and_write_nothing(script, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LDM_COURSE_RUNS", str(tmp_path / "runs"))   # no pipeline, no judge there
    status = bench_module(script).main(["--device", "cpu", "--profile", "smoke", "--out-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert status == 2
    assert f"{script}: nothing measured" in err
    assert "no latent pipeline" in err and "10_cross_attention" in err and "no clothing judge" in err
    assert not (tmp_path / "out").exists()


def test_run_all_summary_reads_every_result_file(results):
    run_all = bench_module("run_all")
    unet = {"meta": {}, "results": [{"name": "mnist", "timings": {   # the shape bench_unet.py writes
        "ours contiguous": {"images_per_s_median": 30.0}, "ours channels_last": {"images_per_s_median": 45.0},
        "diffusers contiguous": {"images_per_s_median": 30.0}, "diffusers channels_last": {"images_per_s_median": 35.0}}}]}
    (results / "unet_cpu.json").write_text(json.dumps(unet))
    assert run_all.main(["--summary-only", "--out-dir", str(results)]) == 0
    (results / "unet_cpu.json").unlink()
    md = (results / "summary.md").read_text()
    assert "| Attained FLOP/s of a training step | `flops_cpu.json` |" in md
    assert "| Latent vs pixel diffusion: training step | `latent_vs_pixel_cpu.json` |" in md
    assert "| Sampling: DDIM-50 vs DDPM-1000 | — | not measured |" in md   # no result file: said, not hidden
    assert "45.0 img/s (ours channels_last) vs 35.0 (diffusers channels_last), 1.29×" in md and "≥ 1.3× (best of ours vs best of diffusers): missed" in md
    summary = json.loads((results / "summary.json").read_text())
    assert set(summary["benchmarks"]) == {"flops", "latent_vs_pixel", "hires", "unet"}
    assert "| High resolution through the same latent: sampling time | `hires_cpu.json` |" in md
    with pytest.raises(SystemExit): run_all.main(["--only", "nonsense", "--out-dir", str(results)])


def test_sampling_benchmark_with_a_tiny_untrained_pipeline_and_judge(tmp_path, monkeypatch, one_thread):
    "End to end: a smoke-sized pipeline and judge saved where the chapters save them; DDIM and DDPM both scored."
    from ldm_course.fashion import load_fashion
    from ldm_course.ldm import build_ldm_scheduler, build_ldm_unet, ldm_checkpoint_path, ldm_config
    from ldm_course.ldm_pipeline import LatentDiffusionPipeline
    from ldm_course.judge import GarmentJudge, GarmentJudgeConfig, judge_checkpoint_path, save_judge
    from ldm_course.text import load_text_encoder
    from ldm_course.vae import build_vae, vae_config
    monkeypatch.setenv("LDM_COURSE_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    encoder = load_text_encoder("auto", device="cpu", allow_download=False, verbose=False)
    cfg = ldm_config("smoke", cond_dim=encoder.dim)
    torch.manual_seed(0)
    vae = build_vae(vae_config("kl", "smoke"))
    LatentDiffusionPipeline(vae, build_ldm_unet(cfg), encoder, build_ldm_scheduler(cfg), cfg).save(ldm_checkpoint_path("09_ldm_additive", "smoke"))
    catalogue, _ = load_fashion(profile="smoke", verbose=False)
    judge = GarmentJudge(GarmentJudgeConfig(tuple(sorted(set(catalogue.records["articleType"]))),
                                            tuple(sorted(set(catalogue.records["baseColour"]))), image_size=16, channels=(4,), feature_dim=8))
    save_judge(judge_checkpoint_path("fashion", "smoke"), judge, {"cache_key": {"split_seed": 0, "heldout_fraction": 0.2}})
    out = tmp_path / "out"
    status = bench_module("bench_sampling").main(["--device", "cpu", "--profile", "smoke", "--num-images", "3", "--ddim-steps", "4",
                                                  "--ddpm-steps", "20", "--out-dir", str(out)])
    assert status == 0
    r = json.loads((out / "sampling_cpu.json").read_text())
    assert set(r["results"]) == {"ddim-4", "ddpm-20"} and r["num_images"] == 3
    assert r["speedup"] == pytest.approx(r["results"]["ddpm-20"]["seconds_per_image"] / r["results"]["ddim-4"]["seconds_per_image"])
    assert r["speedup"] > 1   # 20 steps cost more than 4, even at this size
    assert r["results"]["ddim-4"]["num_fake"] == 3 and r["real_vs_real"]["num_real"] == 3
    assert "real vs real" in (out / "sampling_cpu.md").read_text()

    # issue 17: the solver curve on the same tiny pipeline, every point paired with the DDPM reference
    status = bench_module("bench_solvers").main(["--device", "cpu", "--profile", "smoke", "--num-images", "3", "--steps", "2", "3",
                                                 "--samplers", "ddim", "dpm++", "--ddpm-steps", "20", "--out-dir", str(out)])
    assert status == 0
    s = json.loads((out / "solvers_cpu.json").read_text())
    assert set(s["results"]) == {"ddim-2", "ddim-3", "dpm++-2", "dpm++-3"} and s["reference"]["steps"] == 20
    for row in s["results"].values():
        assert row["speedup"] == pytest.approx(s["reference"]["seconds_per_image"] / row["seconds_per_image"])
        assert row["vs_reference"]["loss"] == pytest.approx(s["reference"]["both"] - row["both"])
    assert s["verdict"]["point"] in ("dpm++-2", "dpm++-3")
    assert all(0 <= r["backdrop_grey"] <= 1 and 0 <= r["both_backdrop_white"] <= 1 for r in [*s["results"].values(), s["reference"]])
    from ldm_course.benchmarks import benchmark_verdicts
    assert benchmark_verdicts("solvers", s) == [s["verdict"]["met"]]
    assert (out / "solvers_cpu.png").read_bytes()[:4] == b"\x89PNG"


def test_unet_benchmark_counts_equal_flops_and_states_the_roofline_ceiling(tmp_path, one_thread):
    "Ours and diffusers at the same architecture do the same FLOPs; shares of the peak and the ceiling follow from them."
    status = bench_module("bench_unet").main(["--device", "cpu", "--configs", "mnist", "--formats", "contiguous", "--batch-size", "2",
                                              "--repeats", "1", "--steps", "1", "--warmup", "1", "--out-dir", str(tmp_path)])
    assert status in (0, None)
    r = json.loads((tmp_path / "unet_cpu.json").read_text())
    peak, row = r["meta"]["matmul_peak_gflops"], r["results"][0]
    flops = row["gflop_per_image"]
    assert flops["ours"] > 0 and flops["ours"] == pytest.approx(flops["diffusers"], rel=0.02)   # same work per image
    for label, tm in row["timings"].items():
        model = label.split()[0]
        assert tm["gflops_attained"] == pytest.approx(tm["images_per_s_median"] * flops[model])
        assert tm["fraction_of_peak"] == pytest.approx(tm["gflops_attained"] / peak)
    assert row["speedup_ceiling"] == pytest.approx(peak / row["timings"]["diffusers contiguous"]["gflops_attained"])
    md = (tmp_path / "unet_cpu.md").read_text()
    assert "% of peak" in md and f"mnist {row['speedup_ceiling']:.2f}×" in md


def test_sampling_time_per_image_is_the_median_over_calls():
    "One batch slowed by other work on the machine must not move the DDIM/DDPM ratio."
    sampling = bench_module("bench_sampling")
    assert sampling.seconds_per_image([(2.4, 24), (2.5, 24), (9.0, 24)]) == pytest.approx(2.5 / 24)
    assert sampling.seconds_per_image([(1.0, 10), (0.5, 4)]) == pytest.approx((0.1 + 0.125) / 2)


def test_our_unet_traces_into_one_graph_for_torch_compile():
    "A data-dependent check in UNet.forward would break torch.compile's graph (and sync the GPU): there must be none."
    from ldm_course.unet import UNet, UNetConfig
    dynamo_graphs = bench_module("bench_unet").dynamo_graphs
    conditional = UNetConfig(4, 4, (8, 16), attention_head_dim=8, norm_num_groups=4, num_classes=3, cond_dim=5)
    from ldm_course.attention import SpatialTransformer
    text = conditional.replace(num_classes=None, cross_attention_levels=(1,), context_dim=6)
    tokens = {"context": torch.randn(2, 3, 6), "context_mask": torch.tensor([[True, True, False], [True, False, False]])}
    for config, kwargs in ((UNetConfig(1, 1, (8, 16), attention_levels=(1,), attention_head_dim=8, norm_num_groups=4), {}),
                           (conditional, {"class_labels": torch.tensor([0, 3]), "cond": torch.randn(2, 5)}),   # chapters 05/06
                           (text, {"cond": torch.randn(2, 5), **tokens})):                                     # chapter 10
        block = (lambda channels, context_dim: SpatialTransformer(channels, context_dim, head_dim=8, groups=4)) if config.cross_attention_levels else None
        model = UNet(config, cross_attention_block=block)
        assert any(isinstance(m, SpatialTransformer) for m in model.modules()) == (block is not None)
        g = dynamo_graphs(model, torch.randn(2, config.in_channels, 8, 8), torch.tensor([3, 900]), **kwargs)
        assert (g["graphs"], g["graph_breaks"], g["break_reasons"]) == (1, 0, []), g
        assert g["fx_ops"] > 10


def test_bench_takes_its_rules_from_benchmarks_not_from_the_report():
    "bench/ and the report share ldm_course.benchmarks; bench/ must not depend on the report's wording (report*.py)."
    report = re.compile(r"^\s*(?:from|import)\s+ldm_course\.report|^\s*from\s+ldm_course\s+import\s+[^\n]*\breport", re.M)
    assert report.search("from ldm_course.report_build import x") and report.search("from ldm_course import core, report")
    for script in sorted(BENCH.glob("*.py")):
        assert not report.search(script.read_text(encoding="utf-8")), f"bench/{script.name} imports the report"
    for script in ("run_all.py", "bench_sampling.py", "bench_latent_vs_pixel.py", "bench_flops.py"):
        assert "from ldm_course.benchmarks import" in (BENCH / script).read_text(encoding="utf-8"), script


def test_run_all_and_the_report_give_the_same_unet_verdict():
    "The verdict rule lives in benchmarks.unet_speedups; run_all's headline must agree with the report's reading."
    from ldm_course.benchmarks import BENCHMARK_TARGETS, benchmark_verdicts, unet_speedups
    timing = lambda ips: {"images_per_s_median": ips}
    result = {"results": [{"name": "mnist", "speedup_ceiling": 1.5, "timings": {
        "ours contiguous": timing(10.0), "ours channels_last": timing(14.0), "diffusers contiguous": timing(8.0),
        "diffusers channels_last": timing(10.0)}}]}
    rows = unet_speedups(result)
    # like with like: diffusers' fastest variant is the base, not its default format
    assert [(r["ours"], r["base"], r["speedup"]) for r in rows] == [("ours channels_last", "diffusers channels_last", 1.4)]
    measured, verdict = bench_module("run_all").headline("unet", result)
    assert "1.40×" in measured and "ceiling at equal FLOPs 1.50×" in measured
    assert verdict.endswith("met") and f"≥ {BENCHMARK_TARGETS['unet']['speedup']:g}×" in verdict
    assert benchmark_verdicts("unet", result) == [True]                              # the report's verdict
    result["results"][0]["timings"]["ours channels_last"] = timing(12.0)
    assert bench_module("run_all").headline("unet", result)[1].endswith("missed")   # 1.2× < 1.3×
    assert benchmark_verdicts("unet", result) == [False]
    # CUDA graphs speed both networks up: ours with them is compared with diffusers with them, never with diffusers eager
    result["results"][0]["timings"].update({"ours contiguous compile-reduce-overhead": timing(52.0),
                                            "diffusers contiguous compile-reduce-overhead": timing(50.0)})
    row, = unet_speedups(result)
    assert (row["ours"], row["base"], row["speedup"]) == ("ours contiguous compile-reduce-overhead",
                                                          "diffusers contiguous compile-reduce-overhead", 1.04)
    with pytest.raises(ValueError, match="no configuration"): unet_speedups({"results": []})


def test_text_budget_ablation_says_what_is_missing_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LDM_COURSE_RUNS", str(tmp_path / "runs"))   # no judge there
    status = bench_module("ablation_text_budget").main(["--device", "cpu", "--profile", "smoke", "--out-dir", str(tmp_path / "out")])
    assert status == 2 and "no clothing judge" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_text_budget_ablation_trains_and_scores_each_variant(tmp_path, monkeypatch, one_thread):
    "Smoke-sized end to end: a variant is chapter 10's config with one change, trained, sampled and judged."
    from ldm_course.cross_attention import cross_attention_config
    from ldm_course.fashion import load_fashion
    from ldm_course.judge import GarmentJudge, GarmentJudgeConfig, judge_checkpoint_path, save_judge
    ablation = bench_module("ablation_text_budget")
    base = cross_attention_config("cpu", context_dim=8)
    changed = ablation.variant_config("cpu", 8, 6, {"max_steps": 900, "pooled": True, "levels": (2,)}, seed=3)
    assert (changed.train.max_steps, changed.train.seed, changed.unet.cond_dim, changed.unet.cross_attention_levels) == (900, 3, 6, (2,))
    assert changed.train.replace(max_steps=base.train.max_steps, seed=0) == base.train   # nothing else moved
    assert ablation.variant_config("cpu", 8, 6, {}, seed=0) == base
    for _, changes in ablation.VARIANTS.values():   # the script prepares the data once: no variant may change it
        c = ablation.variant_config("cpu", 8, 6, changes, seed=1)
        assert (c.held_out_pairs, c.num_train_images) == (base.held_out_pairs, base.num_train_images)
    monkeypatch.setenv("LDM_COURSE_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    catalogue, _ = load_fashion(profile="smoke", verbose=False)
    judge = GarmentJudge(GarmentJudgeConfig(tuple(sorted(set(catalogue.records["articleType"]))),
                                            tuple(sorted(set(catalogue.records["baseColour"]))), image_size=16, channels=(4,), feature_dim=8))
    save_judge(judge_checkpoint_path("fashion", "smoke"), judge, {})
    out = tmp_path / "out"
    assert ablation.main(["--device", "cpu", "--profile", "smoke", "--variants", "chapter10", "--seeds", "0,1",
                          "--num-samples", "1", "--out-dir", str(out)]) == 0
    r = json.loads((out / "ablation_text_cpu.json").read_text())
    assert [(row["variant"], row["seed"]) for row in r["results"]] == [("chapter10", 0), ("chapter10", 1)]
    for row in r["results"]:
        assert {"seed", "held-out", "overall"} <= set(row["alignment"]) and row["train_seconds"] > 0
        assert row["alignment"]["overall"]["num_images"] == len(row["per_prompt"])   # one image per prompt
    assert "| chapter10: chapter 10 as it is | 1 |" in (out / "ablation_text_cpu.md").read_text()


def test_unet_benchmark_trace_says_where_a_step_goes(tmp_path, one_thread):
    "--trace profiles every contender after the timings; its own result file, the timings untouched."
    status = bench_module("bench_unet").main(["--device", "cpu", "--configs", "mnist", "--formats", "contiguous", "--batch-size", "2",
                                              "--repeats", "1", "--steps", "1", "--warmup", "1", "--trace", "--out-dir", str(tmp_path)])
    assert status in (0, None)
    assert not (tmp_path / "unet_cpu.json").exists()   # a traced run never replaces the plain timing result
    r = json.loads((tmp_path / "unet_cpu_trace.json").read_text())
    assert r["meta"]["trace"] is True and r["meta"]["compile_modes"] == []
    for label, tm in r["results"][0]["timings"].items():
        tr = tm["trace"]
        assert tr["steps"] == 3 and tr["wall_ms_per_step"] > 0, label
        assert tr["aten_ops_per_step"] > 50, label   # forward + backward + AdamW of a U-Net: many operators
        assert 0 < tr["top_cpu"][0]["self_ms_per_step"] <= tr["cpu_self_ms_per_step"], label
        assert tr["kernels_per_step"] == 0 and "gpu_busy_fraction" not in tr   # no CUDA here
    md = (tmp_path / "unet_cpu_trace.md").read_text()
    assert "aten ops/step" in md and md.count("| mnist | ") == 2


def test_unet_benchmark_compile_modes_and_gpu_busy_time():
    "Contender names round-trip with torch.compile's modes; overlapping kernels count once in the GPU-busy time."
    bench = bench_module("bench_unet")
    for mode, compile_mode in (("eager", None), ("compile", "default"), ("compile-reduce-overhead", "reduce-overhead")):
        assert bench._parse_label(bench._label("ours", "channels_last", mode)) == ("ours", "channels_last", mode)
        assert bench._compile_mode(mode) == compile_mode
        if compile_mode: assert bench._mode_name(compile_mode) == mode
    assert bench._kernel_busy_us([(0, 10), (5, 12), (20, 25), (21, 22)]) == 17
    assert bench._kernel_busy_us([]) == 0
    with pytest.raises(SystemExit):
        bench.main(["--device", "cpu", "--compile", "--compile-modes", "fastest"])
