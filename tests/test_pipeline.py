"""Integration tests of the papermill pipeline: order, resume, named-cell errors, parameter checks, CLI exit codes."""
import json
import subprocess
import sys
from pathlib import Path

import nbformat
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
    assert json.loads((out / "pipeline.json").read_text()).keys() == {"05_first"}

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
