"""Integration tests of the papermill pipeline: order, resume, named-cell errors, parameter checks, CLI exit codes,
and issue 14: re-runs keyed by everything a stage consumed, failed runs never trusted, absolute paths, one run per folder."""
import json
import subprocess
import sys
from pathlib import Path

import nbformat
import numpy as np
import pytest

from ldm_course.cli import EXIT_USAGE, main
from ldm_course.pipeline import ChapterFailed, pipeline_notebooks, run_pipeline

KERNELSPEC = {"name": "python3", "display_name": "Python 3", "language": "python"}


def write_notebook(path: Path, cells: list[str], parameters: str | None = "profile = 'smoke'") -> Path:
    nb_cells = [nbformat.v4.new_code_cell(parameters, metadata={"tags": ["parameters"]})] if parameters else []
    nb_cells += [nbformat.v4.new_code_cell(src) for src in cells]
    nbformat.write(nbformat.v4.new_notebook(cells=nb_cells, metadata={"kernelspec": KERNELSPEC}), str(path))
    return path


@pytest.fixture
def course(tmp_path):
    "A tiny course: a tool chapter (no parameters), a stage that writes a file, a stage that fails."
    nbs = tmp_path / "nbs"
    nbs.mkdir()
    write_notebook(nbs / "00_tools.ipynb", ["x = 1"], parameters=None)
    write_notebook(nbs / "05_first.ipynb", ["open('first.txt', 'a').write(profile + '\\n')"])
    write_notebook(nbs / "06_second.ipynb", ["a = 1", "raise ValueError('boom in second')"])
    return nbs


def test_stages_are_numbered_notebooks_with_parameters(course):
    assert [p.name for p in pipeline_notebooks(course)] == ["05_first.ipynb", "06_second.ipynb"]


def test_failure_names_notebook_cell_and_error_then_resume_skips_done(course, tmp_path):
    out = tmp_path / "runs"
    with pytest.raises(ChapterFailed) as err:
        run_pipeline("smoke", nbs_dir=course, out_dir=out, library_dir=course)
    e = err.value
    assert e.notebook == "06_second" and e.ename == "ValueError" and "boom in second" in e.evalue
    assert e.cell_index == 3  # injected parameters + parameters + `a = 1` + failing cell
    assert "06_second failed at cell 3: ValueError: boom in second" in str(e)
    executed = nbformat.read(str(e.output), as_version=4)  # the executed copy is kept for inspection
    assert any(o.get("ename") == "ValueError" for c in executed.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert (course / "first.txt").read_text() == "smoke\n"  # kernel ran in the notebooks' folder
    state = json.loads((out / "pipeline.json").read_text())
    assert state["05_first"]["status"] == "done" and state["06_second"]["status"] == "failed"

    write_notebook(course / "06_second.ipynb", ["a = 1"])  # fix the failing chapter
    results = run_pipeline("smoke", nbs_dir=course, out_dir=out, library_dir=course)
    assert [(r.notebook, r.status) for r in results] == [("05_first", "skipped"), ("06_second", "done")]
    assert (course / "first.txt").read_text() == "smoke\n"  # not executed again

    results = run_pipeline("smoke", nbs_dir=course, out_dir=out, library_dir=course, force=True)
    assert [r.status for r in results] == ["done", "done"]
    assert (course / "first.txt").read_text() == "smoke\nsmoke\n"


def test_changed_inputs_rerun_the_stage(course, tmp_path):
    out = tmp_path / "runs"
    run_pipeline("smoke", only=["05"], nbs_dir=course, out_dir=out, library_dir=course)
    (course / "new_module.py").write_text("# library code changed\n")
    results = run_pipeline("smoke", only=["first"], nbs_dir=course, out_dir=out, library_dir=course)
    assert [r.status for r in results] == ["done"]


def test_unknown_parameter_is_an_error_before_anything_runs(course, tmp_path):
    with pytest.raises(ValueError, match=r"No selected notebook has parameter\(s\) \['epochs'\]"):
        run_pipeline("smoke", nbs_dir=course, out_dir=tmp_path / "runs", extra_parameters={"epochs": 3})
    assert not (course / "first.txt").exists()


def test_extra_parameters_go_only_where_defined(course, tmp_path):
    write_notebook(course / "06_second.ipynb", ["open('second.txt', 'w').write(encoder)"], parameters="profile = 'smoke'\nencoder = 'auto'")
    run_pipeline("smoke", nbs_dir=course, out_dir=tmp_path / "runs", library_dir=course, extra_parameters={"encoder": "minilm"})
    assert (course / "second.txt").read_text() == "minilm"
    assert (course / "first.txt").read_text() == "smoke\n"  # 05_first has no `encoder`: it ran without it


def test_cli_usage_errors_exit_2(capsys):
    assert main(["run", "--only", "99_nope"]) == EXIT_USAGE
    assert "Unknown notebook(s) ['99_nope']" in capsys.readouterr().err


def test_console_script_help():
    exe = Path(sys.executable).with_name("ldm-course")
    proc = subprocess.run([str(exe), "run", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "--profile" in proc.stdout


# --- issue 14: never reuse a stale result, never lose a run ------------------------------------------------------------

def _state(out: Path) -> dict:
    return json.loads((out / "pipeline.json").read_text())


def test_real_data_appearing_reruns_the_stage_and_says_why(course, tmp_path, capsys):
    "Repro of issue 14.1: real MNIST files dropped into the data root after a run make the MNIST stage run again."
    from ldm_course.data import write_mnist
    out, data = tmp_path / "runs", tmp_path / "data"
    run_pipeline("smoke", only=["05"], nbs_dir=course, out_dir=out, library_dir=course, data_root=data)
    assert [r.status for r in run_pipeline("smoke", only=["05"], nbs_dir=course, out_dir=out, library_dir=course,
                                           data_root=data)] == ["skipped"]
    images, labels = np.zeros((2, 28, 28), np.uint8), np.array([0, 1], np.uint8)
    write_mnist(data, images, labels, images, labels)
    capsys.readouterr()
    results = run_pipeline("smoke", only=["05"], nbs_dir=course, out_dir=out, library_dir=course, data_root=data)
    assert [r.status for r in results] == ["done"]
    assert results[0].reasons[0].startswith("data changed: mnist (MNIST/raw: absent -> MNIST/raw: 4 files")
    assert "05_first: runs (data changed: mnist" in capsys.readouterr().out
    assert (course / "first.txt").read_text() == "smoke\nsmoke\n"


def test_an_upstream_rerun_invalidates_the_stages_that_read_it(tmp_path):
    "09 reads 07's VAE: re-running 07 (even with --force and the same inputs) makes 09 run again; 08 does not read 07."
    nbs = tmp_path / "nbs"; nbs.mkdir()
    for name in ("07_vae", "08_text", "09_ldm_additive"):
        write_notebook(nbs / f"{name}.ipynb", [f"open('{name}.txt', 'a').write('x')"])
    out, kw = tmp_path / "runs", dict(nbs_dir=nbs, library_dir=nbs, data_root=tmp_path / "data")
    run_pipeline("smoke", out_dir=out, **kw)
    run_pipeline("smoke", only=["07"], force=True, out_dir=out, **kw)
    results = run_pipeline("smoke", out_dir=out, **kw)
    assert [(r.notebook, r.status) for r in results] == [("07_vae", "skipped"), ("08_text", "skipped"), ("09_ldm_additive", "done")]
    assert results[2].reasons == ["input from 07_vae changed"]


def test_a_failed_forced_rerun_is_not_taken_as_up_to_date(course, tmp_path):
    "Repro of issue 14.3: a forced re-run that fails must not leave the earlier success in pipeline.json."
    out = tmp_path / "runs"
    run_pipeline("smoke", only=["05"], nbs_dir=course, out_dir=out, library_dir=course)
    write_notebook(course / "05_first.ipynb", ["raise RuntimeError('disk full')"])
    nb_bytes = (course / "05_first.ipynb").read_bytes()
    with pytest.raises(ChapterFailed):
        run_pipeline("smoke", only=["05"], nbs_dir=course, out_dir=out, library_dir=course, force=True)
    assert _state(out)["05_first"]["status"] == "failed" and not _state(out)["05_first"]["fingerprint"]
    # same inputs again: it runs (and fails) again instead of being skipped
    write_notebook(course / "05_first.ipynb", ["open('first.txt', 'a').write(profile + '\\n')"])
    results = run_pipeline("smoke", only=["05"], nbs_dir=course, out_dir=out, library_dir=course)
    assert [r.status for r in results] == ["done"] and results[0].reasons == ["last run failed"]
    assert nb_bytes  # (the failing notebook was really different)


def test_an_interrupted_run_leaves_the_stage_marked_interrupted(course, tmp_path, monkeypatch):
    "Ctrl-C during a stage: the state says exactly what finished."
    import ldm_course.pipeline as P
    out = tmp_path / "runs"
    run_pipeline("smoke", only=["05"], nbs_dir=course, out_dir=out, library_dir=course)
    def interrupted(*args, **kwargs): raise KeyboardInterrupt
    monkeypatch.setattr(P, "run_stage", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline("smoke", only=["05"], nbs_dir=course, out_dir=out, library_dir=course, force=True)
    assert _state(out)["05_first"]["status"] == "interrupted"


def test_a_dead_kernel_names_the_running_cell(tmp_path):
    "A kernel killed mid-cell (out of memory, kill -9) is reported with that cell, not as a failed kernel start."
    nbs = tmp_path / "nbs"; nbs.mkdir()
    write_notebook(nbs / "05_oom.ipynb", ["a = 1", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"])
    with pytest.raises(ChapterFailed) as err:
        run_pipeline("smoke", nbs_dir=nbs, out_dir=tmp_path / "runs", library_dir=nbs, data_root=tmp_path / "data")
    assert err.value.kernel_died and err.value.cell_index == 3, str(err.value)
    assert "failed at cell 3 (the kernel died" in str(err.value) and "kernel start" not in str(err.value)


def test_relative_runs_folder_is_the_same_for_command_and_notebooks(tmp_path, monkeypatch):
    "Repro of issue 14.4: LDM_COURSE_RUNS=relruns puts notebooks, metrics and figures under <cwd>/relruns only."
    nbs = tmp_path / "course" / "nbs"; nbs.mkdir(parents=True)
    write_notebook(nbs / "05_first.ipynb", ["from ldm_course.core import runs_dir, save_metrics\n"
                                            "save_metrics('05_first', {'where': str(runs_dir(profile))}, profile)"])
    work = tmp_path / "work"; work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("LDM_COURSE_RUNS", "relruns")
    run_pipeline("smoke", nbs_dir=nbs, library_dir=nbs, data_root=tmp_path / "data")
    assert (work / "relruns" / "smoke" / "pipeline.json").is_file()
    metrics = json.loads((work / "relruns" / "smoke" / "metrics" / "05_first.json").read_text())
    assert metrics["where"] == str(work / "relruns" / "smoke")
    assert not (nbs / "relruns").exists()


def test_two_runs_on_one_folder_are_refused_naming_the_other(course, tmp_path):
    "Issue 14.5: a second pipeline on the same runs folder fails at once with the holder's pid; a killed holder leaves no lock."
    from ldm_course.pipeline import RunLocked
    out = tmp_path / "runs"
    holder = subprocess.Popen([sys.executable, "-c", "from ldm_course.pipeline import run_lock\nimport time\n"
                               f"with run_lock({str(out)!r}): print('held', flush=True); time.sleep(120)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunLocked, match=f"pid {holder.pid}"):
            run_pipeline("smoke", nbs_dir=course, out_dir=out, library_dir=course)
        assert not (course / "first.txt").exists()
    finally:
        holder.kill(); holder.wait()
    results = run_pipeline("smoke", only=["05"], nbs_dir=course, out_dir=out, library_dir=course)
    assert [r.status for r in results] == ["done"]


def test_corrupt_pipeline_state_names_the_file(course, tmp_path):
    out = tmp_path / "runs"; out.mkdir()
    (out / "pipeline.json").write_text('{"05_first": {"status": "do')
    with pytest.raises(ValueError, match="pipeline.json is not valid JSON"):
        run_pipeline("smoke", nbs_dir=course, out_dir=out, library_dir=course)


def test_every_stage_declares_what_it_reads():
    "STAGE_INPUTS covers every stage of the course and follows the notebooks' code (loaders, encoder, earlier outputs)."
    from ldm_course.pipeline import STAGE_INPUTS
    nbs = Path(__file__).resolve().parents[1] / "nbs"
    loaders = {"mnist": "load_mnist(", "cifar10": "load_cifar10(", "fashion": "load_fashion("}
    for nb in pipeline_notebooks(nbs):
        assert nb.stem[:2] in STAGE_INPUTS, f"{nb.name} is not declared in pipeline.STAGE_INPUTS"
        declared = STAGE_INPUTS[nb.stem[:2]]
        code = "\n".join(c.source for c in nbformat.read(str(nb), as_version=4).cells if c.cell_type == "code")
        for name, call in loaders.items():
            if call in code: assert name in declared.datasets, f"{nb.name} calls {call} but does not declare {name}"
        if "load_text_encoder(" in code: assert declared.text_encoder, nb.name
        for upstream in ("find_vae(", "load_or_train_vae("):
            if upstream in code: assert "07" in declared.upstream, f"{nb.name} loads chapter 07's VAE"


def test_kernel_noise_goes_to_the_log_not_the_terminal(course, tmp_path, capfd):
    "Issue 17.5: Jupyter's TCP warning and shutdown chatter of a successful run land in the stage's log, not on the terminal."
    out = tmp_path / "runs"
    run_pipeline("smoke", only=["05"], nbs_dir=course, out_dir=out, library_dir=course)
    terminal = capfd.readouterr()
    assert "Kernel is running over TCP" not in terminal.err + terminal.out
    assert "KeyboardInterrupt" not in terminal.err + terminal.out
    assert "Kernel is running over TCP" in (out / "logs" / "05_first.log").read_text()


def test_live_status_reports_section_and_progress(tmp_path):
    "While a stage runs, its status line names the current section and the last progress bar of the kernel."
    from ldm_course.pipeline import run_stage
    nbs = tmp_path / "nbs"; nbs.mkdir()
    nb_cells = [nbformat.v4.new_code_cell("profile = 'smoke'", metadata={"tags": ["parameters"]}),
                nbformat.v4.new_markdown_cell("## Entraîner le modèle"),
                nbformat.v4.new_code_cell("import time\nfrom tqdm import tqdm\n"
                                          "for _ in tqdm(range(30), desc='entraînement', mininterval=0): time.sleep(0.2)")]
    nbformat.write(nbformat.v4.new_notebook(cells=nb_cells, metadata={"kernelspec": KERNELSPEC}), str(nbs / "05_live.ipynb"))
    seen = []
    run_stage(nbs / "05_live.ipynb", {"profile": "smoke"}, tmp_path / "runs", cwd=nbs, on_status=seen.append)
    assert any(s.startswith("Entraîner le modèle · entraînement") and "/30" in s for s in seen), seen
