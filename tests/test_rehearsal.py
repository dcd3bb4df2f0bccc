"""A rehearsal of the gpu profile on CPU, as CI can afford it: the high-resolution autoencoder (07, without its ablation
branches) and the cross-attention chapter (10, which also trains the additive model when chapter 09's is absent) with the
gpu profile's real shapes (512×512 images, 64×16×16 latents, the gpu U-Nets and precision), 4 steps, 2 images per
batch; then its report. Checks that it runs, keeps the real shapes, stays apart from real runs and says what it is."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ldm_course.core import REHEARSAL_VARIABLE, Rehearsal, rehearse
from ldm_course.vae import load_vae, vae_config

ROOT = Path(__file__).resolve().parents[1]
CLI = [str(Path(sys.executable).parent / "ldm-course")]
CHAPTERS = ["07", "10"]


def cli(args: list[str], env: dict, timeout: int, expect: int = 0) -> subprocess.CompletedProcess:
    done = subprocess.run(CLI + args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == expect, f"ldm-course {' '.join(args)} exited {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def clean_env(tmp: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in (REHEARSAL_VARIABLE, "LDM_COURSE_FIGURES", "IN_TEST")}
    return {**env, "LDM_COURSE_RUNS": str(tmp / "runs"), "LDM_COURSE_DATA": str(tmp / "data"), "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "LDM_COURSE_NO_PROGRESS": "1", "MPLBACKEND": "Agg"}


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rehearsal")
    env = clean_env(tmp)
    run = cli(["run", "--profile", "gpu", "--rehearse", "--rehearse-batch-size", "2", "--param", "run_ablation=false",
               "--only", *CHAPTERS], env, timeout=2400)
    report = cli(["report", "--profile", "gpu", "--rehearse", "--no-pdf"], env, timeout=600)
    return {"tmp": tmp, "env": env, "runs": tmp / "runs" / "gpu-rehearsal", "run": run, "report": report}


def test_every_chapter_ran_apart_from_real_runs(rehearsal):
    assert not (rehearsal["tmp"] / "runs" / "gpu").exists(), "a rehearsal must never write into the real runs folder"
    state = json.loads((rehearsal["runs"] / "pipeline.json").read_text())
    for stem in (s for s in state if s[:2] in CHAPTERS): assert state[stem]["status"] == "done", (stem, state[stem])
    assert {s[:2] for s in state} >= set(CHAPTERS)
    for chapter in ("07_vae", "10_cross_attention"):
        metrics = json.loads((rehearsal["runs"] / "metrics" / f"{chapter}.json").read_text())
        assert metrics["profile"] == "gpu" and metrics["rehearsal"] == Rehearsal(batch_size=2).to_dict(), chapter


def test_the_autoencoder_has_the_gpu_shapes(rehearsal):
    real = vae_config("kl", "gpu")   # this process is no rehearsal: the real gpu preset
    vae = load_vae(rehearsal["runs"] / "checkpoints" / "07_vae_kl" / "vae.safetensors").eval()
    assert (vae.config.image_size, vae.config.block_out_channels, vae.config.latent_shape) == \
        (512, real.block_out_channels, (64, 16, 16))
    with torch.no_grad(): z = vae.encode_latents(torch.zeros(1, 3, 512, 512))
    assert z.shape == (1, 64, 16, 16)


def test_the_cross_attention_model_has_the_gpu_widths(rehearsal):
    from ldm_course.cross_attention import cross_attention_config
    from ldm_course.ldm_pipeline import LatentDiffusionPipeline
    real = cross_attention_config("gpu")   # this process is no rehearsal: the real gpu preset
    pipe = LatentDiffusionPipeline.load(rehearsal["runs"] / "checkpoints" / "10_cross_attention" / "ldm.safetensors", device="cpu")
    unet = pipe.config.unet
    assert (unet.block_out_channels, unet.cross_attention_levels, unet.in_channels) == \
        (real.unet.block_out_channels, real.unet.cross_attention_levels, 64)
    assert (pipe.config.train.max_steps, pipe.config.train.batch_size, pipe.config.train.mixed_precision) == \
        (Rehearsal().train_steps, 2, real.train.mixed_precision)
    assert pipe.vae.config.image_size == 512


def test_the_report_says_it_is_a_rehearsal(rehearsal):
    html = (rehearsal["runs"] / "report" / "rapport.html").read_text(encoding="utf-8")
    assert "RÉPÉTITION" in html and "pas des résultats" in html
    assert "lots plafonnés à 2 images" in html, "the banner states the caps the run used, read from its metrics"


def test_the_caps_are_part_of_the_stage_identity(rehearsal):
    "The same rehearsal is skipped when up to date; another batch cap is another rehearsal, so the stage runs again."
    runs = [cli(["run", "--profile", "gpu", "--rehearse", "--rehearse-batch-size", str(b), "--only", "08"], rehearsal["env"],
                timeout=600) for b in (2, 2, 3)]
    outputs = [r.stdout + r.stderr for r in runs]
    assert ["08_text: runs" in o for o in outputs] == [True, False, True], outputs
    assert "08_text: up to date, skipped" in outputs[1], outputs[1]


def test_rehearse_batch_size_needs_rehearse(tmp_path):
    done = cli(["run", "--profile", "gpu", "--rehearse-batch-size", "2", "--only", "08"], clean_env(tmp_path), timeout=120, expect=2)
    assert "--rehearse-batch-size needs --rehearse" in done.stderr


def test_rehearse_keeps_shapes_and_lowers_counts():
    cfg = vae_config("kl", "gpu")
    r = rehearse(cfg, Rehearsal())
    assert (r.image_size, r.block_out_channels, r.latent_shape, r.train_crop_size) == \
        (cfg.image_size, cfg.block_out_channels, cfg.latent_shape, cfg.train_crop_size)
    assert 0 < r.disc_start < Rehearsal().train_steps and 0 < r.perceptual_start < Rehearsal().train_steps
