"""End to end, as a newcomer runs it: every chapter notebook on the smoke profile, then the report, through the
`ldm-course` console script, in a temporary runs/figures folder. Then a second run, which must skip everything."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm_course.core import read_checkpoint_metadata
from ldm_course.pipeline import CHAPTER_CONFIGS, chapter_configs, pipeline_notebooks

ROOT = Path(__file__).resolve().parents[1]
CLI = [str(Path(sys.executable).parent / "ldm-course")]  # the console script, as a user calls it
HAS_TEX = shutil.which("latexmk") is not None


def cli(args: list[str], env: dict, timeout: int) -> subprocess.CompletedProcess:
    "Run `ldm-course ARGS`, failing the test with its output when it does not exit 0."
    done = subprocess.run(CLI + args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"ldm-course {' '.join(args)} exited {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    "The whole course on the smoke profile, then the report, in temporary runs/ and figures/ folders."
    tmp = tmp_path_factory.mktemp("e2e")
    env = {**os.environ, "LDM_COURSE_RUNS": str(tmp / "runs"), "LDM_COURSE_FIGURES": str(tmp / "figures"),
           "HF_HUB_OFFLINE": "1", "LDM_COURSE_NO_PROGRESS": "1"}
    sources_before = git_status()
    start = time.perf_counter()
    run = cli(["run", "--profile", "smoke"], env, timeout=1200)
    run_seconds = time.perf_counter() - start
    report = cli(["report", "--profile", "smoke"] + ([] if HAS_TEX else ["--no-pdf"]), env, timeout=600)
    print(f"smoke pipeline {run_seconds:.0f} s, report {time.perf_counter() - start - run_seconds:.0f} s")
    return {"tmp": tmp, "env": env, "runs": tmp / "runs" / "smoke", "figures": tmp / "figures",
            "run": run, "report": report, "seconds": run_seconds, "sources_before": sources_before}


def git_status() -> str:
    "Porcelain status of the notebooks and the report's figures ('' outside a git checkout)."
    if not (ROOT / ".git").exists(): return ""
    return subprocess.run(["git", "status", "--porcelain", "--", "nbs", "reports/figures"], cwd=ROOT,
                          capture_output=True, text=True).stdout


def statuses(output: str) -> dict[str, str]:
    "Stage -> status from the table `ldm-course run` prints (name, status, seconds, path)."
    names = set(stage_names())
    return {w[0]: w[1] for w in (line.split() for line in output.splitlines()) if len(w) >= 2 and w[0] in names}


def stage_names() -> list[str]:
    return [nb.stem for nb in pipeline_notebooks(ROOT / "nbs")]


def test_every_stage_ran_and_left_its_executed_copy(smoke_run):
    state = json.loads((smoke_run["runs"] / "pipeline.json").read_text())
    assert sorted(state) == sorted(stage_names())
    executed = {p.stem for p in smoke_run["runs"].rglob("*.ipynb")}
    missing = [s for s in stage_names() if s not in executed]
    assert not missing, f"no executed notebook for {missing}"


def test_nothing_was_written_into_the_sources(smoke_run):
    assert git_status() == smoke_run["sources_before"], "the smoke run changed nbs/ or reports/figures/"
    assert statuses(smoke_run["run"].stdout) == {name: "done" for name in stage_names()}


def test_metrics_and_figures_are_where_the_report_reads_them(smoke_run):
    metrics = {p.stem for p in (smoke_run["runs"] / "metrics").glob("*.json")}
    assert "05_ddpm_mnist" in metrics and "06_ddpm_cifar10" in metrics, metrics
    figures = sorted(smoke_run["figures"].glob("fig*.png"))
    assert len(figures) >= 5, figures
    for fig in figures:
        pixels = np.asarray(Image.open(fig).convert("L"), dtype=np.float32) / 255
        assert pixels.std() > 0.02, f"{fig.name} looks blank"


def test_each_chapter_ran_with_the_sizes_its_config_function_gives(smoke_run):
    "Issue 15: `chapter_configs(N, P)` answers 'what sizes did chapter N use at profile P', and a run proves it."
    runs = smoke_run["runs"]
    for chapter in CHAPTER_CONFIGS:
        expected = {name: c.to_dict() for name, c in chapter_configs(chapter, "smoke").items()}
        saved_file = runs / "configs" / f"{chapter}.json"
        assert json.loads(saved_file.read_text())["configs"] == expected, f"{chapter} ran with other sizes than chapter_configs"
        digest = hashlib.sha256(saved_file.read_bytes()).hexdigest()
        metrics = json.loads((runs / "metrics" / f"{chapter}.json").read_text())
        assert metrics["provenance"]["configs"][chapter] == digest, f"{chapter}'s metrics do not name the configs they came from"
    # the checkpoints carry the same models
    model = lambda chapter: chapter_configs(chapter, "smoke")["experiment"]
    for chapter in ("05_ddpm_mnist", "06_ddpm_cifar10"):
        header = read_checkpoint_metadata(runs / "checkpoints" / chapter / "ddpm_ema.safetensors")
        assert header["config"]["unet"] == model(chapter).unet.to_dict(), chapter
    for chapter in ("09_ldm_additive", "10_cross_attention"):
        header = read_checkpoint_metadata(runs / "checkpoints" / chapter / "ldm.safetensors")
        assert header["ldm_config"]["unet"] == model(chapter).unet.to_dict(), chapter
        assert header["vae_config"] == chapter_configs("07_vae", "smoke")["autoencoder"].to_dict(), chapter
    figures = [json.loads(p.read_text()) for p in smoke_run["figures"].glob("fig*.png.json")]
    assert any("09_ldm_additive" in f.get("configs", {}) for f in figures), "no figure names the configs it came from"


def test_report_is_built_from_this_run(smoke_run):
    html = smoke_run["runs"] / "report" / "rapport.html"
    assert html.is_file(), list((smoke_run["runs"] / "report").iterdir())
    text = html.read_text(encoding="utf-8")
    assert "data:image/png;base64" in text, "the figures of the run are embedded"
    assert "smoke" in text


@pytest.mark.skipif(not HAS_TEX, reason="needs latexmk (installed by .ci/run)")
def test_report_pdf_pages_are_not_blank(smoke_run, pdf_pages_look_filled):
    pdf_pages_look_filled(smoke_run["runs"] / "report" / "rapport.pdf")


def test_second_run_skips_every_completed_stage(smoke_run):
    again = cli(["run", "--profile", "smoke"], smoke_run["env"], timeout=300)
    assert statuses(again.stdout) == {name: "skipped" for name in stage_names()}, again.stdout


def test_evaluation_reuses_the_judges_chapters_05_and_06_trained(smoke_run):
    "Chapter 11 takes the pixel judges of 05/06 when their stored training key (data, architecture, recipe, seed) matches."
    from ldm_course.core import read_checkpoint_metadata
    for dataset, chapter in (("mnist", "05_ddpm_mnist"), ("cifar10", "06_ddpm_cifar10")):
        meta = read_checkpoint_metadata(smoke_run["runs"] / "checkpoints" / "11_judge" / f"{dataset}.safetensors")
        assert meta["trained_in"] == chapter, (dataset, meta["trained_in"])
        chapter_meta = read_checkpoint_metadata(smoke_run["runs"] / "checkpoints" / chapter / "judge.safetensors")
        assert chapter_meta["training_key"] == meta["cache_key"]
