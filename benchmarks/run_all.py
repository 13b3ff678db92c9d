"""Run every step's benchmark and write one JSON: each figure beside the tutorial's way, measured in the same run.

    python benchmarks/run_all.py --out bench_out/benchmarks.json          (~10 minutes on 2 CPU cores)
    python benchmarks/run_all.py --quick --out bench_out/quick.json        (fewer frames and steps)

Each benchmark runs in its own process so its peak memory (MiB, the process and its workers) is its own.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

FULL = {
    "crop_face": ["--frames", "300", "--naive-frames", "40"],
    "train": ["--steps", "3"],
    "convert": ["--frames", "300", "--tutorial-frames", "15"],
}
QUICK = {
    "crop_face": ["--frames", "100", "--naive-frames", "15"],
    "train": ["--steps", "1", "--frames", "100"],
    "convert": ["--frames", "60", "--tutorial-frames", "5"],
}


def run_one(name, args):
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / f"{name}.json"
        start = time.time()
        proc = subprocess.Popen([sys.executable, str(HERE / f"bench_{name}.py"), *args, "--out", str(out)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        err = proc.stderr.read()
        if proc.returncode != 0:
            raise SystemExit(f"benchmark {name} failed:\n{err[-2000:]}")
        result = json.loads(out.read_text())
    result["peak_rss_mib"] = round(usage.ru_maxrss / 1024, 1)
    result["wall_s"] = round(time.time() - start, 1)
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench_out/benchmarks.json", help="where the JSON goes")
    p.add_argument("--quick", action="store_true", help="fewer frames and steps (a rough figure, faster)")
    p.add_argument("--only", nargs="*", choices=list(FULL), help="run only these benchmarks")
    a = p.parse_args(argv)
    plan = QUICK if a.quick else FULL
    results = {}
    for name in a.only or plan:
        print(f"running bench_{name}.py {' '.join(plan[name])} ...", flush=True)
        results[name] = run_one(name, plan[name])
    import platform

    import torch
    results["machine"] = dict(cpu_count=os.cpu_count(), torch=torch.__version__, python=platform.python_version(),
                              cuda=torch.cuda.is_available())
    text = json.dumps(results, indent=1)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
