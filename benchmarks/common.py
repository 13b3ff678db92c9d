"""Shared bits of the benchmark scripts: where the real data is, timing, JSON output."""
import contextlib
import csv
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data"
VIDEOS = DATA / "videos"
CLIPS_256 = ["styletalk_obama_clip1.mp4", "styletalk_andrew_clip1.mp4"]
CLIPS_512 = ["sadtalker_WDA_AlexandriaOcasioCortez_000.mp4", "sadtalker_WDA_KatieHill_000.mp4"]


def require_data():
    if not VIDEOS.is_dir():
        raise SystemExit(f"benchmark data not found at {DATA} (the shared/ folder beside the checkout)")


@contextlib.contextmanager
def checkout(commit, folder):
    """An earlier commit's files in `folder` (a git worktree, removed afterwards), to time beside this one."""
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-f", "--detach", str(folder), commit],
                   check=True, capture_output=True)
    try:
        yield Path(folder)
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(folder)], capture_output=True)


def timed(fn, *args, **kwargs):
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t


def fastest(repeats, fn, *args):
    """Seconds of the fastest of `repeats` calls fn(k, *args) (k = 0, 1, ...): the machine's noise only slows."""
    return min(timed(fn, k, *args)[1] for k in range(repeats))


def log_rate(model_dir):
    """samples/s of a finished train.py run: the median of its log.csv rows after the first two, which hold
    the start-up (the last row alone for a run too short to have more)."""
    with open(Path(model_dir) / "log.csv", newline="") as f:
        rows = [float(r["samples_per_s"]) for r in csv.DictReader(f)]
    return float(np.median(rows[2:] if len(rows) > 4 else rows[-1:]))


def peak_rss_mib():
    """Peak resident memory of this process and its finished children, MiB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return round(max(own, kids) / 1024, 1)


def report(results, out_path=None):
    text = json.dumps(results, indent=1)
    print(text)
    if out_path:
        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        Path(out_path).write_text(text + "\n")
