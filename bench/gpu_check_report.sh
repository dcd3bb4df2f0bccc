#!/usr/bin/env bash
# The HTML report of a GPU check's rehearsal, built here from what the device call returned (bench/gpu_check.sh).
# pandoc does not travel to the device (pypandoc-binary: 34 MB, 20 MB as xz), so the device returns the run
# (metrics, figures, pipeline.json, logs, executed notebooks) and this script renders the report with them,
# exactly as `ldm-course report --profile gpu --rehearse --no-pdf` would have there.
#
#   bench/gpu_check_report.sh <files_at of the device call> [DEST]
#
# DEST (default runs/gpucheck-returned, ignored like runs/; not under .gpucheck/, which travels) gets the run in
# DEST/runs/gpu-rehearsal/ and the report in DEST/runs/gpu-rehearsal/report/rapport.html.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
FROM=${1:?usage: bench/gpu_check_report.sh FILES_AT [DEST]}
DEST=$(mkdir -p "${2:-$REPO/runs/gpucheck-returned}" && cd "${2:-$REPO/runs/gpucheck-returned}" && pwd)
PY=${PYTHON:-$REPO/.venv/bin/python}
shopt -s nullglob
parts=("$FROM"/rehearsal.tar.gz "$FROM"/rehearsal.tar.gz.part?)   # part0..part3: in order
[ ${#parts[@]} -gt 0 ] || { echo "gpu_check_report: no rehearsal.tar.gz[.partN] in $FROM" >&2; exit 1; }
rm -rf "$DEST/runs/gpu-rehearsal" && mkdir -p "$DEST/runs/gpu-rehearsal"
cat "${parts[@]}" | tar xz -C "$DEST/runs/gpu-rehearsal"
echo "unpacked ${#parts[@]} file(s) into $DEST/runs/gpu-rehearsal"
[ -f "$FROM/gpu_check.json" ] && cp "$FROM/gpu_check.json" "$DEST/"
cd "$REPO" && LDM_COURSE_RUNS="$DEST/runs" "$PY" -m ldm_course.cli report --profile gpu --rehearse --no-pdf
