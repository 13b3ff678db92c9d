"""Peak memory of convert_video.py against the length and size of the video, and its rate at 1080p end to end.

A clip is made from a real talking head of ../shared/data, enlarged to the frame size asked for (1080p, 4K) and
looped to 1x and 10x a base length; each is converted by convert_video.py as a fresh process (a tiny model,
untrained: the weights do not change the memory or the speed), and its peak resident memory (the process and
its children, from the kernel's accounting) and frames per second from start to finish are recorded. Memory
that does not grow from 1x to 10x is bounded by the frames in flight, not by the video.

    python benchmarks/bench_memory.py --sizes 1080 2160 --frames 150 --out bench_out/memory.json
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from common import ROOT, VIDEOS, report, require_data

import models
import video

SOURCE = "styletalk_obama_clip1.mp4"


def make_clip(path, height, frames):
    """A 16:9 clip `height` px high of `frames` frames: the source's frames enlarged into the middle of a grey
    frame, looped, H.264."""
    width = height * 16 // 9
    source = [f for _, f in zip(range(300), video.read_video(VIDEOS / SOURCE))]
    writer = video.VideoWriter(path, 30, width, height, crf=23, metadata_note="benchmark clip")
    side = height * 3 // 4
    for k in range(frames):
        canvas = np.full((height, width, 3), 96, np.uint8)
        x0, y0 = (width - side) // 2, (height - side) // 2
        canvas[y0:y0 + side, x0:x0 + side] = cv2.resize(source[k % len(source)], (side, side),
                                                        interpolation=cv2.INTER_CUBIC)
        writer.write(canvas)
    writer.close()
    return path


def converted(clip, model_dir, out):
    """(peak resident MiB of convert_video.py and its children, seconds, frames/s) for one conversion."""
    start = time.time()
    proc = subprocess.Popen([sys.executable, str(ROOT / "convert_video.py"), "--video-path", str(clip),
                             "--model-dir", str(model_dir), "--output-path", str(out), "--overwrite"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.time() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"convert_video.py failed on {clip}: {proc.stderr.read()[-500:]}")
    frames = video.video_info(out)["frames"]
    return round(usage.ru_maxrss / 1024, 1), round(seconds, 1), round(frames / seconds, 2)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[1080, 2160], help="frame heights")
    p.add_argument("--frames", type=int, default=150, help="frames of the 1x clip (the 10x clip has ten times)")
    p.add_argument("--lengths", type=int, nargs="+", default=[1, 10], help="multiples of --frames")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    require_data()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        model = models.build_model(models.model_config("tiny"))
        (tmp / "model").mkdir()
        models.save_checkpoint(tmp / "model", dict(model=model.state_dict(), config=model.config, step=0))
        for height in args.sizes:
            for length in args.lengths:
                clip = make_clip(tmp / f"{height}p_{length}x.mp4", height, args.frames * length)
                peak, seconds, fps = converted(clip, tmp / "model", tmp / "out.mp4")
                rows.append(dict(height=height, frames=args.frames * length, peak_rss_mib=peak, seconds=seconds,
                                 frames_per_s=fps))
                print(rows[-1], flush=True)
                clip.unlink()
    report(dict(benchmark="convert memory and length", source=SOURCE, threads=torch.get_num_threads(),
                rows=rows), args.out)


if __name__ == "__main__":
    main()
