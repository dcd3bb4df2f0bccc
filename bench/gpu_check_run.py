"""The gpu profile's rehearsal, stage by stage under one time budget, and the files a device call brings back.

Called by bench/gpu_check.sh once the carried packages are installed and the encoder rebuilt (see that script's header
for the device call). Each chapter runs as its own `python -m ldm_course.cli run --profile gpu --rehearse --only NN`
(the same command a user types), so a slow or hung chapter is stopped at its own limit and the next ones still run:

- order `STAGE_ORDER`: the GPU-heavy chapters first (05, 06, 07, 08, 09, 10, 11, each after those it reads), then
  01, 02 and 04, which the CPU rehearsal already covers and whose GPU work is small;
- limit of a stage: its cap in `STAGE_CAPS`, cut to what the budget leaves after `RESERVE_S` for the report and the
  packing; a stage left less than `MIN_STAGE_S` is not started ("not run: budget");
- at its limit a stage gets SIGINT (papermill shuts its kernel down and pipeline.json says "interrupted"), then
  SIGKILL `GRACE_S` later for the command and the kernel it started (by their process ids).

Peak GPU memory: each kernel writes torch.cuda.max_memory_allocated/max_memory_reserved when it exits (an IPython
startup file in $IPYTHONDIR, written here; the course's code is untouched), and a sampler reads the device's used
memory (NVML, else nvidia-smi) every 0.25 s while each stage runs.

A finished run on the same machine is resumed: the pipeline skips stages already done with the same inputs.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

STAGE_ORDER = ("05", "06", "07", "08", "09", "10", "11", "01", "02", "04")
STAGE_CAPS = {"05": 120, "06": 120, "07": 150, "08": 90, "09": 120, "10": 120, "11": 150, "01": 60, "02": 60, "04": 60}
TEXT_STAGES = ("08", "09", "10")   # the notebooks with an `encoder` parameter
RESERVE_S = 40                     # report, summary and packing after the last stage
MIN_STAGE_S = 20                   # not worth starting a chapter (kernel start, imports) with less
GRACE_S = 20                       # between SIGINT and SIGKILL
PART_BYTES = 14 * 2**20            # a returned file is at most 16 MiB
MAX_PARTS = 4                      # 8 files come back: log, summary, stage logs, and the run's tarball in <= 4 parts
RETURNED_RUN_ITEMS = ("pipeline.json", "metrics", "figures", "logs", "report", "notebooks")  # never checkpoints or caches

STARTUP_FILE = '''\
# bench/gpu_check_run.py: record this kernel's peak CUDA memory when it exits (nothing else).
def _gpu_check_record_peak():
    import atexit, json, os, sys
    folder = os.environ.get("GPU_CHECK_PEAKS")
    def write():
        torch = sys.modules.get("torch")
        record = {"stage": os.environ.get("LDM_COURSE_STAGE", "?"), "cuda": False}
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            record.update(cuda=True, device=torch.cuda.get_device_name(), max_allocated=torch.cuda.max_memory_allocated(),
                          max_reserved=torch.cuda.max_memory_reserved())
        with open(os.path.join(folder, f"{record['stage']}.{os.getpid()}.json"), "w") as f: json.dump(record, f)
    if folder: atexit.register(write)
_gpu_check_record_peak()
del _gpu_check_record_peak
'''


def stage_limit(cap: float, # the stage's own cap (s)
                remaining: float, # seconds left before the deadline
                reserve: float = RESERVE_S, # kept for the report and packing
                minimum: float = MIN_STAGE_S, # under this, the stage is not started
               ) -> int | None: # seconds the stage may run, None: do not start it
    "A stage's time limit: its cap, cut to the budget left after the reserve; None when too little is left."
    limit = min(cap, remaining - reserve)
    return int(limit) if limit >= minimum else None


def select_stages(only: list[str] | None) -> list[str]:
    "The stages to run, in STAGE_ORDER; an unknown number is an error naming the known ones."
    if not only: return list(STAGE_ORDER)
    wanted = [s.zfill(2) for s in only]
    unknown = [s for s in wanted if s not in STAGE_ORDER]
    if unknown: raise ValueError(f"unknown stage(s) {unknown}; expected among {list(STAGE_ORDER)}")
    return [s for s in STAGE_ORDER if s in wanted]


def stage_command(python: str, stage: str, encoder: str | None, batch_size: int | None) -> list[str]:
    "The `ldm-course run` command of one stage of the gpu profile's rehearsal."
    cmd = [python, "-m", "ldm_course.cli", "run", "--profile", "gpu", "--rehearse", "--only", stage]
    if batch_size: cmd += ["--rehearse-batch-size", str(batch_size)]
    if encoder and stage in TEXT_STAGES: cmd += ["--param", f"encoder={encoder}"]
    return cmd


class MemorySampler:
    "Peak used GPU memory (MiB) per stage, read every `every` s from NVML (else nvidia-smi) in a daemon thread."
    def __init__(self, every: float = 0.25):
        self.every, self.stage, self.peaks, self.source = every, None, {}, None
        self.stop = threading.Event()
        try:
            import pynvml
            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            self.read, self.source = (lambda: pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20), "nvml"
        except Exception:
            if shutil.which("nvidia-smi"): self.read, self.source, self.every = self._smi, "nvidia-smi", max(every, 1.0)
        if self.source: threading.Thread(target=self._loop, daemon=True).start()

    @staticmethod
    def _smi() -> float:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True, timeout=10).stdout
        return float(out.split()[0])

    def _loop(self):
        while not self.stop.wait(self.every):
            try: used = self.read()
            except Exception: continue
            if self.stage: self.peaks[self.stage] = max(self.peaks.get(self.stage, 0.0), used)


def _descendants(pid: int) -> list[int]:
    "Process ids below `pid` (the papermill kernel starts in its own session, so a process group does not hold it)."
    try:
        import psutil
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except Exception: return []


def _kill(pids: list[int], sig: int) -> None:
    for pid in pids:
        try: os.kill(pid, sig)
        except (ProcessLookupError, PermissionError): pass


def run_stage(cmd: list[str], limit: int, env: dict, log_to) -> tuple[str, float, int | None]:
    "Run one stage's command for at most `limit` s; (status, seconds, exit code). Its output goes to `log_to`."
    start = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=log_to, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        rc = proc.wait(timeout=limit)
        return ("done" if rc == 0 else "failed"), time.monotonic() - start, rc
    except subprocess.TimeoutExpired:
        children = _descendants(proc.pid)
        print(f"gpu_check: stage over its {limit} s limit: SIGINT to pid {proc.pid}", flush=True)
        proc.send_signal(signal.SIGINT)
        try: proc.wait(timeout=GRACE_S)
        except subprocess.TimeoutExpired: pass
        left = [proc.pid] * (proc.poll() is None) + [p for p in children + _descendants(proc.pid) if p != proc.pid]
        _kill(sorted(set(left)), signal.SIGKILL)
        proc.wait()
        return "timeout", time.monotonic() - start, None


def _read_json(path: Path) -> dict:
    try: return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError): return {}


def kernel_peaks(folder: Path) -> dict[str, dict]:
    "stem -> the largest peak any of its kernels recorded (bytes), from the startup file's records."
    peaks = {}
    for f in sorted(folder.glob("*.json")):
        r = _read_json(f)
        if not r.get("cuda"): continue
        best = peaks.setdefault(r["stage"], {"max_allocated": 0, "max_reserved": 0})
        for k in best: best[k] = max(best[k], r.get(k, 0))
    return peaks


def summarise(info: dict, stages: list[dict], runs: Path, peaks: dict, sampler: MemorySampler | None, report: dict) -> dict:
    "The summary written to gpu_check.json: device, install, encoder, each stage (status, seconds, memory), report."
    pipeline = _read_json(runs / "pipeline.json")
    rows = []
    for s in stages:
        stem = next((k for k in pipeline if k.startswith(s["stage"] + "_")), None)
        record, peak = pipeline.get(stem, {}) if stem else {}, peaks.get(stem or "", {})
        rows.append({**s, "notebook": stem, "pipeline_status": record.get("status"), "pipeline_seconds": record.get("seconds"),
                     "peak_allocated_gib": round(peak["max_allocated"] / 2**30, 2) if peak else None,
                     "peak_reserved_gib": round(peak["max_reserved"] / 2**30, 2) if peak else None,
                     "device_used_peak_mib": round(sampler.peaks[s["stage"]]) if sampler and s["stage"] in sampler.peaks else None})
    done = [r for r in rows if r["status"] == "done"]
    return {**info, "memory_sampler": sampler.source if sampler else None, "stages": rows,
            "stages_done": f"{len(done)}/{len(rows)}", "stage_seconds_total": round(sum(r["seconds"] or 0 for r in rows), 1),
            "report": report, "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def print_table(summary: dict) -> None:
    print(f"\n{'stage':<22} {'status':<18} {'seconds':>8} {'limit':>6} {'alloc GiB':>10} {'used MiB':>9}")
    for r in summary["stages"]:
        print(f"{(r['notebook'] or r['stage']):<22} {r['status']:<18} {r['seconds'] or 0:>8.1f} {r['limit_s'] or '-':>6} "
              f"{r['peak_allocated_gib'] if r['peak_allocated_gib'] is not None else '-':>10} "
              f"{r['device_used_peak_mib'] if r['device_used_peak_mib'] is not None else '-':>9}")
    print(f"stages done {summary['stages_done']}, {summary['stage_seconds_total']} s; report: {summary['report'].get('status')}")


def print_log_tail(runs: Path, stage: str, lines: int = 40) -> None:
    "The end of a failed stage's own log (the kernel's output), so that the one returned log shows the error."
    for log in sorted((runs / "logs").glob(f"{stage}_*.log")):
        text = log.read_text(encoding="utf-8", errors="replace").splitlines()
        print(f"--- last {min(lines, len(text))} lines of {log.name}:", *text[-lines:], "---", sep="\n", flush=True)


def pack_outputs(runs: Path, work: Path, out: Path) -> dict[str, int]:
    "stage_logs.tar.gz (small, always) and rehearsal.tar.gz (the run without checkpoints), split into 14 MiB parts."
    files = {}
    with tarfile.open(out / "stage_logs.tar.gz", "w:gz") as tar:
        for name in ("pipeline.json", "logs", "metrics"):
            if (runs / name).exists(): tar.add(runs / name, arcname=f"gpu-rehearsal/{name}")
        for p in sorted(work.glob("*.json")) + sorted(work.glob("*.txt")) + [work / "peaks"]:
            if p.exists(): tar.add(p, arcname=f"gpu_check/{p.name}")
    files["stage_logs.tar.gz"] = (out / "stage_logs.tar.gz").stat().st_size
    for leave_out in ((), ("notebooks",), ("notebooks", "report")):
        whole = work / "rehearsal.tar.gz"
        with tarfile.open(whole, "w:gz") as tar:
            for name in RETURNED_RUN_ITEMS:
                if name not in leave_out and (runs / name).exists(): tar.add(runs / name, arcname=name)
        size = whole.stat().st_size
        if size <= PART_BYTES * MAX_PARTS: break
        print(f"gpu_check: rehearsal.tar.gz is {size / 2**20:.1f} MiB: leaving out {leave_out or 'nothing'} was not enough")
    if size <= PART_BYTES: shutil.move(whole, out / whole.name); files[whole.name] = size
    else:
        with open(whole, "rb") as f:
            for i in range(MAX_PARTS):
                chunk = f.read(PART_BYTES)
                if not chunk: break
                (out / f"rehearsal.tar.gz.part{i}").write_bytes(chunk); files[f"rehearsal.tar.gz.part{i}"] = len(chunk)
        whole.unlink()
    return files


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="folder that comes back ($OUT)")
    p.add_argument("--work", type=Path, required=True, help="scratch folder on the machine (runs/, info files)")
    p.add_argument("--deadline", type=float, required=True, help="Unix time by which everything must be written")
    p.add_argument("--started", type=float, default=time.time(), help="Unix time the check started (for elapsed_s)")
    p.add_argument("--encoder", help="text encoder folder for chapters 08-10 (--param encoder=...)")
    p.add_argument("--only", nargs="+", metavar="NN", help="these stages only (in STAGE_ORDER)")
    p.add_argument("--batch-size", type=int, help="--rehearse-batch-size (a small machine)")
    p.add_argument("--mode", default="gpu", choices=("gpu", "cpu-dry-run"))
    args = p.parse_args(argv)
    stages = select_stages(args.only)
    runs = Path(os.environ["LDM_COURSE_RUNS"]) / "gpu-rehearsal"
    peaks_dir, ipython = args.work / "peaks", args.work / "ipython"
    peaks_dir.mkdir(parents=True, exist_ok=True)
    (ipython / "profile_default" / "startup").mkdir(parents=True, exist_ok=True)
    (ipython / "profile_default" / "startup" / "00-gpu-check-peak.py").write_text(STARTUP_FILE, encoding="utf-8")
    env = {**os.environ, "IPYTHONDIR": str(ipython), "GPU_CHECK_PEAKS": str(peaks_dir), "LDM_COURSE_NO_PROGRESS": "1"}
    info = {"check": "gpu profile rehearsal (bench/gpu_check.sh)", "mode": args.mode, "budget_deadline_utc":
            datetime.datetime.fromtimestamp(args.deadline, datetime.timezone.utc).isoformat(timespec="seconds"),
            "rehearsal_batch_size_cap": args.batch_size, "encoder_folder": args.encoder}
    for name in ("device", "install", "kernel", "encoder"):
        info[name] = _read_json(args.work / f"{name}.json") or None
    sampler = MemorySampler() if args.mode == "gpu" else None
    results, report = [], {"status": "not attempted"}
    def write():
        summary = summarise(info, results, runs, kernel_peaks(peaks_dir), sampler, report)
        summary["elapsed_s"] = round(time.time() - args.started, 1)
        (args.out / "gpu_check.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    for stage in stages:
        limit = stage_limit(STAGE_CAPS[stage], args.deadline - time.time())
        cmd = stage_command(sys.executable, stage, args.encoder, args.batch_size)
        if limit is None:
            results.append({"stage": stage, "status": "not run: budget", "seconds": None, "limit_s": None, "exit_code": None})
            print(f"gpu_check: stage {stage} not run: {args.deadline - time.time():.0f} s left, {RESERVE_S} s kept for the end", flush=True)
            write(); continue
        print(f"\n=== stage {stage} (limit {limit} s): {' '.join(cmd)}", flush=True)
        if sampler: sampler.stage = stage
        status, seconds, rc = run_stage(cmd, limit, env, sys.stdout)
        if sampler: sampler.stage = None
        results.append({"stage": stage, "status": status, "seconds": round(seconds, 1), "limit_s": limit, "exit_code": rc})
        print(f"=== stage {stage}: {status} in {seconds:.1f} s", flush=True)
        if status != "done": print_log_tail(runs, stage)
        write()
    have_pandoc = shutil.which("pandoc") is not None or __import__("importlib").util.find_spec("pypandoc") is not None
    left = args.deadline - time.time() - 15
    if not have_pandoc: report = {"status": "not built here: pandoc does not travel (see bench/gpu_check_report.sh)"}
    elif left < 15: report = {"status": f"not built: {left + 15:.0f} s left"}
    else:
        cmd = [sys.executable, "-m", "ldm_course.cli", "report", "--profile", "gpu", "--rehearse", "--no-pdf"]
        print(f"\n=== report (limit {int(left)} s): {' '.join(cmd)}", flush=True)
        status, seconds, rc = run_stage(cmd, int(left), env, sys.stdout)
        report = {"status": "built" if status == "done" else f"{status} (see gpu_check.log)", "seconds": round(seconds, 1), "exit_code": rc}
    write()
    summary = json.loads((args.out / "gpu_check.json").read_text(encoding="utf-8"))
    print_table(summary)
    if sampler: sampler.stop.set()
    files = pack_outputs(runs, args.work, args.out)
    print("returned: " + ", ".join(f"{k} ({v / 2**20:.1f} MiB)" for k, v in files.items()), flush=True)
    return 0 if all(r["status"] == "done" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
