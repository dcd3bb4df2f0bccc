"""The `ldm-course` console script (chapter 14): help and exit codes of every sub-command, `report` writes the report,
`data generate` writes the synthetic fallbacks and `data check` reports real data, generated folders and skipped rows,
`sample` writes the PNG of a prompt from a saved pipeline (round trip from a tiny checkpoint, missing model, bad arguments)."""
import argparse
import contextlib
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm_course import cli
from ldm_course.core import save_metrics
from ldm_course.data import write_mnist
from ldm_course.fashion import KAGGLE_COLUMNS
from ldm_course.report_build import ReportBuildError

SCRIPT = shutil.which("ldm-course") or str(Path(sys.executable).parent / "ldm-course")


def run_main(argv):
    "main(argv) in-process: (exit code, stdout, stderr)."
    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(io.StringIO()) as err:
        code = cli.main(argv)
    return code, out.getvalue(), err.getvalue()


def _commands(parser: argparse.ArgumentParser, prefix=()):
    "Every (sub-)command path of the parser, e.g. ('data', 'check')."
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*prefix, name)
                yield from _commands(sub, (*prefix, name))


def test_every_subcommand_has_a_help():
    commands = list(_commands(cli.build_parser()))
    assert {("run",), ("report",), ("data",), ("data", "generate"), ("data", "check"), ("sample",)} <= set(commands)
    for command in [(), *commands]:
        code, out, _ = run_main([*command, "--help"])
        assert code == cli.EXIT_OK and out.startswith(f"usage: ldm-course {' '.join(command)}".rstrip()), command


@pytest.mark.parametrize("argv", [["nope"], ["report", "--profile", "fast"], ["data"], ["data", "erase"],
                                  ["data", "generate", "--seed", "x"], ["data", "generate", "--only", "imagenet"], []])
def test_usage_errors_exit_2(argv):
    code, _, err = run_main(argv)
    assert code == cli.EXIT_USAGE and "usage: ldm-course" in err, (argv, err)


def test_console_script_is_installed():
    done = subprocess.run([SCRIPT, "data", "check", "--bogus"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "unrecognized arguments: --bogus" in done.stderr


def test_report_smoke_writes_the_files(tmp_path, monkeypatch):
    monkeypatch.setenv("LDM_COURSE_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("LDM_COURSE_FIGURES", str(tmp_path / "figures"))
    save_metrics("05_ddpm_mnist", {"train": {"loss_first_20": 0.5, "loss_last_20": 0.25, "steps": 30}}, "smoke")
    done = subprocess.run([SCRIPT, "report", "--profile", "smoke"], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "MPLBACKEND": "Agg"})
    assert done.returncode == 0, done.stderr
    out = tmp_path / "runs" / "smoke" / "report"
    html = (out / "rapport.html").read_text(encoding="utf-8")
    assert "0,25" in html and "non mesuré (chapitre 09)" in html
    assert f"html  {out / 'rapport.html'}" in done.stdout
    assert (out / "build" / "rapport.tex").is_file() and (out / "build" / "rapport.md").is_file()
    if shutil.which("latexmk"): assert (out / "rapport.pdf").read_bytes().startswith(b"%PDF")
    else: assert "not built (latexmk not found" in done.stdout


def test_report_failure_exits_1(monkeypatch):
    def failing(**kwargs): raise ReportBuildError("LaTeX failed on rapport.tex: ! Undefined control sequence.")
    monkeypatch.setattr(cli, "build_report", failing)
    code, _, err = run_main(["report", "--profile", "smoke"])
    assert code == cli.EXIT_FAILED and "Undefined control sequence" in err


def _kaggle_catalogue(folder: Path) -> None:
    "A tiny Kaggle-layout catalogue: 3 good rows, 1 malformed line (unquoted comma), 1 row without its image."
    (folder / "images").mkdir(parents=True)
    rows = [",".join(KAGGLE_COLUMNS)]
    for i, (kind, colour) in enumerate([("Dresses", "Red"), ("Tshirts", "Blue"), ("Jeans", "Yellow")], start=1):
        rows.append(f"{i},Women,Apparel,Topwear,{kind},{colour},Summer,2012,Casual,{colour} {kind} for women")
        Image.new("RGB", (192, 256), (200, 50, 50)).save(folder / "images" / f"{i}.jpg")   # photos that serve the cpu profile's 256 px
    rows.append("4,Men,Apparel,Topwear,Tshirts,Black,Summer,2012,Casual,Black tshirt, with a comma")
    rows.append("5,Men,Apparel,Topwear,Tshirts,Pink,Summer,2012,Casual,Pink tshirt without image")
    (folder / "styles.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")


def test_data_generate_then_check(tmp_path):
    root = tmp_path / "data"
    code, out, err = run_main(["data", "generate", "--profile", "smoke", "--seed", "3", "--only", "mnist", "--root", str(root)])
    assert code == 0, err
    assert "mnist    generated" in out and "600 train + 100 test" in out and (root / "synthetic" / "mnist-seed3-n600").is_dir()
    code, out, _ = run_main(["data", "generate", "--profile", "smoke", "--seed", "3", "--only", "mnist", "--root", str(root)])
    assert "mnist    up to date" in out                                  # a second run re-uses the folder

    rng = np.random.default_rng(0)
    write_mnist(root, rng.integers(0, 255, (12, 28, 28), dtype=np.uint8), np.arange(12) % 10,
                rng.integers(0, 255, (5, 28, 28), dtype=np.uint8), np.arange(5))
    _kaggle_catalogue(root / "fashion-product-images")
    done = subprocess.run([SCRIPT, "data", "check", "--root", str(root)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert f"data root: {root}" in out
    assert "mnist    real     12 train + 5 test images" in out
    assert "cifar10  missing  CIFAR10 not found" in out
    assert "fashion  real     3 usable of 5 rows" in out
    assert "skipped  malformed_line 1, missing_image 1" in out          # the Kaggle skip counts, by reason
    assert "profiles photos 192x256 serve smoke, cpu; too small for gpu (512 px): get the full-size archive" in out
    assert "mnist-seed3-n600" in out and "mnist, seed 3, 600 train + 100 test" in out


def test_data_check_says_which_profiles_a_small_archive_serves(tmp_path):
    "The 60×80 Kaggle archive is found (not 'missing'), and check says it is too small for the hi-res profiles."
    root = tmp_path / "data"
    _kaggle_catalogue(root / "fashion-product-images-small")
    for p in (root / "fashion-product-images-small" / "images").glob("*.jpg"): Image.new("RGB", (60, 80), (9, 9, 200)).save(p)
    code, out, err = run_main(["data", "check", "--root", str(root)])
    assert code == 0, err
    assert "fashion  real     3 usable of 5 rows" in out
    assert "photos 60x80 serve smoke; too small for cpu (256 px), gpu (512 px): get the full-size archive fashion-product-images" in out


def test_data_generate_draws_the_catalogue_at_the_profile_size(tmp_path):
    code, out, err = run_main(["data", "generate", "--profile", "smoke", "--only", "fashion", "--root", str(tmp_path)])
    assert code == 0, err
    folder = next((tmp_path / "synthetic").glob("fashion-*"))
    assert folder.name.endswith("-s64") and Image.open(next((folder / "images").glob("*.jpg"))).size == (64, 64)


@pytest.fixture(scope="module")
def smoke_checkpoint(tmp_path_factory):
    "A tiny, untrained text-to-image pipeline saved with LatentDiffusionPipeline.save (MiniLM, offline)."
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from ldm_course.ldm import build_ldm_scheduler, build_ldm_unet, ldm_config
    from ldm_course.ldm_pipeline import LatentDiffusionPipeline
    from ldm_course.text import load_text_encoder
    from ldm_course.vae import build_vae, vae_config
    encoder = load_text_encoder("minilm", device="cpu", verbose=False)
    torch.manual_seed(0)
    cfg = ldm_config("smoke", cond_dim=encoder.dim, num_inference_steps=3)
    unet = build_ldm_unet(cfg)
    with torch.no_grad():   # away from the zero-initialised output layer, so that the seed and prompt matter
        for p in unet.parameters(): p.add_(0.02 * torch.randn_like(p))
    pipe = LatentDiffusionPipeline(build_vae(vae_config("kl", "smoke")), unet, encoder, build_ldm_scheduler(cfg), cfg)
    return pipe.save(tmp_path_factory.mktemp("pipeline") / "ldm.safetensors"), pipe.vae.config.image_size


def test_sample_round_trip_from_a_checkpoint(smoke_checkpoint, tmp_path):
    checkpoint, S = smoke_checkpoint
    def sample(name, *extra):
        code, out, err = run_main(["sample", "a red dress", "--checkpoint", str(checkpoint), "--out", str(tmp_path / name), *extra])
        assert code == cli.EXIT_OK, err
        return (tmp_path / name).read_bytes(), out
    first, out = sample("a.png", "--seed", "1")
    assert str(tmp_path / "a.png") in out and "additive pipeline" in out and "minilm" in out and "DDIM 3 steps" in out
    image = Image.open(tmp_path / "a.png")
    assert image.format == "PNG" and image.size == (S, S) and image.mode == "RGB"
    assert np.asarray(image).std() > 0
    assert sample("b.png", "--seed", "1")[0] == first                          # same seed: the same bytes
    assert sample("c.png", "--seed", "2")[0] != first
    assert sample("d.png", "--seed", "1", "--guidance", "0")[0] != first        # w is applied
    assert sample("e.png", "--seed", "1", "--steps", "2")[0] != first           # so are the steps
    _, out = sample("grid.png", "--seed", "1", "--num-images", "3")
    assert Image.open(tmp_path / "grid.png").size == (3 * S + 4 * 2, S + 2 * 2) and "3 × 'a red dress'" in out
    assert not list(tmp_path.glob(".*.tmp")), "no temporary file is left behind"


def test_sample_with_dpm_solver(smoke_checkpoint, tmp_path):
    "`--sampler dpm++ --steps 15`: DPM-Solver++(2M) from chapter 02, the pipeline's own images, reproducible."
    import torch
    from ldm_course.ldm_pipeline import LatentDiffusionPipeline
    checkpoint, S = smoke_checkpoint
    def sample(name, *extra):
        code, out, err = run_main(["sample", "a red dress", "--checkpoint", str(checkpoint), "--seed", "1", "--out",
                                   str(tmp_path / name), *extra])
        assert code == cli.EXIT_OK, err
        return np.asarray(Image.open(tmp_path / name)), out
    dpm, out = sample("dpm.png", "--sampler", "dpm++", "--steps", "15")
    assert "DPM-Solver++(2M) 15 steps" in out and dpm.shape == (S, S, 3)
    pipe = LatentDiffusionPipeline.load(checkpoint, device="cpu")
    with torch.no_grad(): images = pipe(["a red dress"], num_inference_steps=15, seed=1, sampler="dpm++").images
    expected = (((images[0] + 1) / 2).clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    assert np.abs(dpm.astype(int) - expected.astype(int)).max() <= 1          # the PNG holds the pipeline's DPM-Solver++ image
    assert np.array_equal(sample("again.png", "--sampler", "dpm++", "--steps", "15")[0], dpm)
    ddim, out = sample("ddim.png", "--steps", "15")
    assert "DDIM 15 steps" in out and not np.array_equal(ddim, dpm)          # the default stays the pipeline's DDIM
    sde, out = sample("sde.png", "--sampler", "sde-dpm++", "--steps", "15")
    assert "SDE-DPM-Solver++(2M) 15 steps" in out and not np.array_equal(sde, dpm)


def test_sample_finds_the_profile_checkpoint_chapter_10_first(smoke_checkpoint, tmp_path, monkeypatch):
    checkpoint, _ = smoke_checkpoint
    monkeypatch.setenv("LDM_COURSE_RUNS", str(tmp_path / "runs"))
    chapter_09 = tmp_path / "runs" / "smoke" / "checkpoints" / "09_ldm_additive" / "ldm.safetensors"
    chapter_09.parent.mkdir(parents=True)
    shutil.copy(checkpoint, chapter_09)
    code, out, err = run_main(["sample", "black dress", "--profile", "smoke", "--seed", "4"])
    assert code == cli.EXIT_OK, err
    default_out = tmp_path / "runs" / "smoke" / "samples" / "black_dress_seed4.png"
    assert default_out.is_file() and str(chapter_09) in out
    chapter_10 = chapter_09.parent.parent / "10_cross_attention" / "ldm.safetensors"
    chapter_10.parent.mkdir()
    shutil.copy(checkpoint, chapter_10)
    code, out, _ = run_main(["sample", "black dress", "--profile", "smoke", "--out", str(tmp_path / "x.png")])
    assert code == cli.EXIT_OK and str(chapter_10) in out


def test_sample_without_a_checkpoint_says_how_to_make_one(tmp_path, monkeypatch):
    monkeypatch.setenv("LDM_COURSE_RUNS", str(tmp_path / "runs"))
    code, out, err = run_main(["sample", "a red dress", "--profile", "cpu", "--out", str(tmp_path / "a.png")])
    assert code == cli.EXIT_FAILED and out == ""
    assert str(tmp_path / "runs" / "cpu" / "checkpoints" / "09_ldm_additive" / "ldm.safetensors") in err
    assert "ldm-course run --only 09 --profile cpu" in err
    assert not (tmp_path / "a.png").exists()
    code, _, err = run_main(["sample", "a red dress", "--checkpoint", str(tmp_path / "nope.safetensors")])
    assert code == cli.EXIT_USAGE and "nope.safetensors does not exist" in err


def test_sample_refuses_a_file_that_is_not_a_pipeline(tmp_path):
    from ldm_course.core import save_checkpoint
    import torch
    other = save_checkpoint(tmp_path / "other.safetensors", {"w": torch.zeros(1)})
    code, _, err = run_main(["sample", "a red dress", "--checkpoint", str(other), "--out", str(tmp_path / "a.png")])
    assert code == cli.EXIT_USAGE and "not a latent diffusion pipeline" in err


@pytest.mark.parametrize("extra, message", [
    (["--steps", "0"], "argument --steps: expected 1 <= value <= 1,000"),
    (["--steps", "5000"], "argument --steps: expected 1 <= value <= 1,000 (the diffusion has T = 1000 steps), got 5,000"),
    (["--steps", "-3"], "argument --steps"),
    (["--steps", "ten"], "argument --steps"),
    (["--guidance", "-1"], "argument --guidance: expected a finite number >= 0"),
    (["--guidance", "nan"], "argument --guidance"),
    (["--num-images", "0"], "argument --num-images"),
    (["--num-images", "100000"], "argument --num-images: expected 1 <= value <= 64 (images side by side in one PNG)"),
    (["--seed", str(2**64)], "argument --seed: expected 0 <= value <= 9,223,372,036,854,775,807"),
    (["--seed", "-1"], "argument --seed"),
    (["--profile", "fast"], "argument --profile"),
    (["--out", "image.jpg"], "--out must name a .png file"),
    (["--sampler", "euler"], "argument --sampler: invalid choice: 'euler'"),
])
def test_sample_bad_arguments_exit_2(extra, message, tmp_path, monkeypatch):
    monkeypatch.setenv("LDM_COURSE_RUNS", str(tmp_path))   # no checkpoint: arguments are checked before looking for one
    code, _, err = run_main(["sample", "a red dress", *extra])
    assert code == cli.EXIT_USAGE and message in err, err


def test_sample_checks_out_before_sampling(tmp_path, monkeypatch):
    "Issue 14: an --out that cannot be written is refused before any model is loaded or image generated."
    monkeypatch.setenv("LDM_COURSE_RUNS", str(tmp_path / "runs"))   # no checkpoint either: the --out check comes first
    (tmp_path / "dir.png").mkdir()
    code, _, err = run_main(["sample", "a red dress", "--out", str(tmp_path / "dir.png")])
    assert code == cli.EXIT_USAGE and "is a folder" in err
    locked = tmp_path / "locked"; locked.mkdir(); locked.chmod(0o500)
    try:
        if not os.access(locked, os.W_OK):   # root ignores permissions
            code, _, err = run_main(["sample", "a red dress", "--out", str(locked / "a.png")])
            assert code == cli.EXIT_USAGE and f"cannot write in {locked}" in err
    finally: locked.chmod(0o700)
    blocker = tmp_path / "file"; blocker.write_text("x")
    code, _, err = run_main(["sample", "a red dress", "--out", str(blocker / "a.png")])
    assert code == cli.EXIT_USAGE and "cannot write in" in err


def test_run_refuses_profile_as_a_param():
    code, _, err = run_main(["run", "--param", "profile=gpu", "--only", "05"])
    assert code == cli.EXIT_USAGE and "--param profile=gpu is not allowed; use --profile gpu" in err


def test_report_waits_for_no_one_it_names_the_running_pipeline(tmp_path, monkeypatch):
    "Issue 14.5 through the CLI: `report` while another process holds runs/<profile> exits 1 naming it."
    monkeypatch.setenv("LDM_COURSE_RUNS", str(tmp_path / "runs"))
    holder = subprocess.Popen([sys.executable, "-c", "from ldm_course.pipeline import run_lock\nimport time\n"
                               f"with run_lock({str(tmp_path / 'runs' / 'smoke')!r}): print('held', flush=True); time.sleep(120)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        code, _, err = run_main(["report", "--profile", "smoke", "--no-pdf"])
        assert code == cli.EXIT_FAILED and f"pid {holder.pid}" in err and "in use by another ldm-course process" in err
    finally:
        holder.kill(); holder.wait()


def test_relative_env_folders_are_made_absolute_at_the_edge(tmp_path, monkeypatch):
    "Issue 14.4: a relative LDM_COURSE_DATA is read from the folder where the command was typed."
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LDM_COURSE_DATA", "mydata")
    code, out, _ = run_main(["data", "check"])
    assert code == cli.EXIT_OK and f"data root: {tmp_path / 'mydata'}" in out
    assert os.environ["LDM_COURSE_DATA"] == str(tmp_path / "mydata")


def test_sample_empty_or_missing_prompt_exits_2():
    code, _, err = run_main(["sample", "  "])
    assert code == cli.EXIT_USAGE and "the prompt is empty" in err
    code, _, err = run_main(["sample"])
    assert code == cli.EXIT_USAGE and "the following arguments are required: prompt" in err
