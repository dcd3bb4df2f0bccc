"""bench/profile_cost.py times each chapter's real training recipe and projects the profile's training time. On the
smoke profile (seconds): every chapter gets a positive step time, the projection uses the recipe's own max_steps,
the tables have a row per chapter and a total, notebook records are set beside it, and failures are reported."""
from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest
import torch

from ldm_course.cross_attention import cross_attention_config
from ldm_course.ddpm import ddpm_config
from ldm_course.ldm import ldm_config
from ldm_course.metrics import eval_config
from ldm_course.vae import vae_train_config

BENCH = Path(__file__).resolve().parents[1] / "bench"


def profile_cost():
    "Import bench/profile_cost.py as a module (it imports its sibling machine.py)."
    if str(BENCH) not in sys.path: sys.path.insert(0, str(BENCH))
    return importlib.import_module("profile_cost")


def smoke_recipes() -> dict:
    "The smoke TrainConfig of each row, straight from the chapters' config functions."
    return {"05_mnist": ddpm_config("mnist", "smoke").train, "05_mnist_judge": ddpm_config("mnist", "smoke").judge_train,
            "06_cifar10": ddpm_config("cifar10", "smoke").train, "06_cifar10_judge": ddpm_config("cifar10", "smoke").judge_train,
            "07_vae_kl": vae_train_config("kl", "smoke"), "07_vae_vq": vae_train_config("vq", "smoke"),
            "09_additive": ldm_config("smoke").train, "10_cross_attention": cross_attention_config("smoke").train,
            "11_garment_judge": eval_config("smoke").judge_train}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, one_thread):
    "Every chapter on the smoke profile, beside a fake notebook run of chapter 05 in runs/smoke; the output folder."
    runs, out = tmp_path_factory.mktemp("runs"), tmp_path_factory.mktemp("bench")
    (runs / "smoke" / "metrics").mkdir(parents=True)
    (runs / "smoke" / "metrics" / "05_ddpm_mnist.json").write_text(json.dumps(
        {"device": "cpu", "torch_threads": 1, "train": {"steps": 30, "seconds_wall": 3.0}, "judge": {"steps": 30, "train_seconds": 0.6}}))
    (runs / "smoke" / "pipeline.json").write_text(json.dumps({"05_ddpm_mnist": {"status": "done", "seconds": 20.0}}))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LDM_COURSE_RUNS", str(runs))
        status = profile_cost().main(["--profile", "smoke", "--device", "cpu", "--warmup", "1", "--steps", "2", "--out-dir", str(out)])
    assert status == 0
    return out


def test_every_chapter_is_timed_and_projected_with_its_recipe(smoke_run):
    r = json.loads((smoke_run / "profile_cost_smoke_cpu.json").read_text())
    assert r["benchmark"] == "profile_cost" and r["profile"] == "smoke" and r["machine"]["device"] == "cpu"
    recipes = smoke_recipes()
    rows = {row["chapter"]: row for row in r["rows"]}
    assert list(rows) == list(recipes)
    for name, train in recipes.items():
        row = rows[name]
        assert "error" not in row, row.get("error")
        assert row["train_config"] == train.to_dict()   # the notebook's recipe, unchanged
        assert row["seconds_per_step"] > 0 and row["steps_timed"] == 2 and len(row["warmup_seconds"]) == 1
        assert row["seconds_min"] <= row["seconds_per_step"] <= row["seconds_max"]
        assert row["projected_seconds"] == pytest.approx(row["seconds_per_step"] * train.max_steps)
    assert r["total"]["projected_seconds"] == pytest.approx(sum(row["projected_seconds"] for row in r["rows"]))


def test_markdown_has_a_row_per_chapter_a_total_and_the_notebook_comparison(smoke_run):
    md = (smoke_run / "profile_cost_smoke_cpu.md").read_text()
    for title in [c.title for c in profile_cost().CHAPTERS.values()]:
        assert md.count(f"\n| {title} |") == 1, title
    assert "\n| **total** |" in md
    assert "3.0 s (30 steps, 0.100 s/step)" in md   # chapter 05's recorded training, beside its projection
    r = json.loads((smoke_run / "profile_cost_smoke_cpu.json").read_text())
    mnist = next(row for row in r["rows"] if row["chapter"] == "05_mnist")
    assert mnist["recorded"]["seconds_per_step"] == pytest.approx(0.1)
    assert [n["notebook"] for n in r["notebooks"]] == ["05_ddpm_mnist"]   # the only notebook in pipeline.json
    assert r["notebooks"][0]["wall_seconds"] == 20.0 and "upper bound" in md and "| 05_ddpm_mnist |" in md


def test_a_failing_chapter_is_reported_and_the_others_still_run(tmp_path, monkeypatch, one_thread, capsys):
    pc = profile_cost()
    def out_of_memory(profile, tokens): raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
    monkeypatch.setitem(pc.CHAPTERS, "07_vae_kl", pc.CHAPTERS["07_vae_kl"]._replace(build=out_of_memory))
    monkeypatch.setenv("LDM_COURSE_RUNS", str(tmp_path / "runs"))
    status = pc.main(["--profile", "smoke", "--device", "cpu", "--chapters", "07", "--warmup", "1", "--steps", "1",
                      "--out-dir", str(tmp_path)])
    assert status == 1
    r = json.loads((tmp_path / "profile_cost_smoke_cpu.json").read_text())
    kl, vq = r["rows"]
    assert "OutOfMemoryError" in kl["error"] and vq["seconds_per_step"] > 0
    assert r["total"]["failed"] == ["07_vae_kl"] and r["total"]["projected_seconds"] == pytest.approx(vq["projected_seconds"])
    assert "07_vae_kl: FAILED" in capsys.readouterr().err
    assert "failed: OutOfMemoryError" in (tmp_path / "profile_cost_smoke_cpu.md").read_text()


def test_an_unknown_chapter_is_an_argparse_error_naming_the_choices(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        profile_cost().main(["--device", "cpu", "--chapters", "05,08_text", "--out-dir", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown chapter '08_text'" in err and "09_additive" in err
    assert not list(tmp_path.iterdir())


def test_chapter_numbers_select_all_their_rows():
    pc = profile_cost()
    parser = pc.argparse.ArgumentParser()
    assert pc.select_chapters("06,09_additive,06_cifar10", parser) == ["06_cifar10", "06_cifar10_judge", "09_additive"]
    assert pc.select_chapters(None, parser) == list(pc.CHAPTERS)


def test_precisions_are_timed_interleaved_on_the_same_recipe(tmp_path, one_thread):
    "Issue 17.3: --precisions times each recipe in fp32 and bf16 autocast, alternating, and reports the speed-up."
    status = profile_cost().main(["--profile", "smoke", "--device", "cpu", "--warmup", "1", "--steps", "2", "--chapters", "05_mnist",
                                  "--precisions", "no", "bf16", "--rounds", "2", "--out-dir", str(tmp_path)])
    assert status == 0
    r = json.loads((tmp_path / "precision_smoke_cpu.json").read_text())
    assert r["benchmark"] == "precision" and r["precisions"] == ["no", "bf16"] and r["rounds"] == 2
    row = r["rows"][0]
    assert row["chapter"] == "05_mnist" and set(row["seconds_per_step"]) == {"no", "bf16"} and not row["errors"]
    assert row["speedup"]["bf16"] == pytest.approx(row["seconds_per_step"]["no"] / row["seconds_per_step"]["bf16"])
    assert "speed-up bf16 autocast" in (tmp_path / "precision_smoke_cpu.md").read_text()


# --- issue 17.3: bf16 quality against fp32 (bench/precision_quality.py) ------------------------------------------------

def test_precision_quality_trains_both_precisions_and_gives_a_verdict_per_measure(tmp_path, one_thread, monkeypatch):
    monkeypatch.setenv("LDM_COURSE_RUNS", str(tmp_path / "runs"))
    if str(BENCH) not in sys.path: sys.path.insert(0, str(BENCH))
    bench = importlib.import_module("precision_quality")
    assert bench.main(["--chapters", "05", "--profile", "smoke", "--seeds", "0,1", "--samples", "1", "--device", "cpu",
                       "--out-dir", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "precision_quality_smoke_cpu.json").read_text())["results"][0]
    assert {(r["seed"], r["precision"]) for r in result["rows"]} == {(0, "no"), (0, "bf16"), (1, "no"), (1, "bf16")}
    assert all(0 <= r["judge_accuracy"] <= 1 and r["test_loss"] > 0 for r in result["rows"])
    verdicts = {v["measure"]: v for v in result["verdicts"]}
    assert set(verdicts) == {"judge_accuracy", "test_loss"}
    by = {(r["seed"], r["precision"]): r["test_loss"] for r in result["rows"]}
    assert verdicts["test_loss"]["fp32_seed_spread"] == pytest.approx(abs(by[0, "no"] - by[1, "no"]))
    assert verdicts["test_loss"]["standard_error"] == 0.0   # fixed draws: the seed spread is the only noise
    assert "| 05_ddpm_mnist | judge_accuracy |" in (tmp_path / "precision_quality_smoke_cpu.md").read_text()


def test_precision_verdict_is_within_noise_only_inside_the_spread():
    if str(BENCH) not in sys.path: sys.path.insert(0, str(BENCH))
    bench = importlib.import_module("precision_quality")
    rows = [{"seed": s, "precision": p, "test_loss": v} for (s, p), v in
            {(0, "no"): 0.10, (1, "no"): 0.11, (0, "bf16"): 0.105, (1, "bf16"): 0.115}.items()]
    assert bench.verdicts({"rows": rows, "measures": ("test_loss",)})[0]["within_noise"]
    rows[2]["test_loss"], rows[3]["test_loss"] = 0.20, 0.21   # far outside the fp32 seeds' spread
    assert not bench.verdicts({"rows": rows, "measures": ("test_loss",)})[0]["within_noise"]


# --- issue 15: the same-weights check of a refactor (bench/compare_checkpoints.py) ---------------------------------------

def test_compare_checkpoints_sees_one_changed_weight_and_ignores_timings(tmp_path):
    from ldm_course.core import save_checkpoint
    if str(BENCH) not in sys.path: sys.path.insert(0, str(BENCH))
    bench = importlib.import_module("compare_checkpoints")
    weights = {"model": {"w": torch.arange(6.0)}, "ema": {"model": {"w": torch.arange(6.0)}}}
    for name, speed in (("before", 10.0), ("after", 11.0)):
        folder = tmp_path / name / "cpu" / "checkpoints" / "05_ddpm_mnist" / "train-abc"
        folder.mkdir(parents=True)
        save_checkpoint(folder / "step_0000010.safetensors", {**weights, "history": {"images_per_s": torch.tensor([speed])}}, {})
    args = ["--before", str(tmp_path / "before"), "--after", str(tmp_path / "after"), "--chapters", "05_ddpm_mnist"]
    assert bench.main(args) == 0   # only the measured speed differs
    changed = {**weights, "model": {"w": torch.arange(6.0) + 1e-6}, "history": {"images_per_s": torch.tensor([11.0])}}
    save_checkpoint(tmp_path / "after" / "cpu" / "checkpoints" / "05_ddpm_mnist" / "train-abc" / "step_0000010.safetensors", changed, {})
    assert bench.main(args) == 1
    assert bench.compare(*(bench.final_checkpoint(tmp_path / n, "cpu", "05_ddpm_mnist") for n in ("before", "after")))["differ"] == ["/model/w"]


# --- chapter 11's judge and the backdrop (bench/judge_backdrop.py) ----------------------------------------------------

def test_judge_backdrop_trains_both_recipes_and_pairs_the_readings(tmp_path, one_thread, monkeypatch):
    monkeypatch.setenv("LDM_COURSE_RUNS", str(tmp_path / "runs"))   # no pipeline there: photos only, said so
    if str(BENCH) not in sys.path: sys.path.insert(0, str(BENCH))
    bench = importlib.import_module("judge_backdrop")
    assert bench.main(["--profile", "smoke", "--device", "cpu", "--out-dir", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "judge_backdrop_smoke_cpu.json").read_text())
    assert [r["backdrop"] for r in result["rows"]] == [0.0, result["backdrop_strength"]] and result["pipeline"] is None
    for row in result["rows"]:
        for key in ("photos_type", "photos_colour"):
            r = row[key]
            assert r["num_images"] == result["num_heldout"] and r["difference"] == pytest.approx(r["second"] - r["first"])
        assert "generated_type" not in row
    assert "| 0 | photos, type: white → random backdrop |" in (tmp_path / "judge_backdrop_smoke_cpu.md").read_text()
