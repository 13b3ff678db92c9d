"""Benchmark convert_video.py end to end (frames/s) against the tutorial's conversion loop.

The tutorial's loop, as ../shared/REFERENCE.md describes it, minus its 2 s sleep per frame: for every
frame it rebuilds the model and reloads the checkpoint, detects with dlib at upsample 1 on the full
frame, crops the raw box, applies random_warp, runs decoder B, pastes with a full-rectangle
seamlessClone and writes 1920x1080 MJPG. Both use the default "original" model (weights do not
change the speed) on the same real clips, in one run.

    python benchmarks/bench_convert.py --frames 150 --tutorial-frames 15 --out bench_out/convert.json
"""
import argparse
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from common import CLIPS_256, CLIPS_512, VIDEOS, report, require_data

import convert_video
import models
import train
import utils


def make_checkpoint(model_dir):
    torch.manual_seed(0)
    model = models.build_model(models.model_config("original"))
    model_dir.mkdir(parents=True, exist_ok=True)
    train.save_checkpoint(model_dir, train.checkpoint_state(model, train.make_optimizer(model, 5e-5), 0, 0.0, 0),
                          is_best=False)


def tutorial_convert(video, ckpt_path, out_path, max_frames):
    import dlib

    cap = cv2.VideoCapture(str(video))
    writer = cv2.VideoWriter(str(out_path), cv2.VideoWriter_fourcc(*"MJPG"), 3, (1920, 1080))
    detector = dlib.get_frontal_face_detector()
    rng = np.random.default_rng(0)
    frames = 0
    while frames < max_frames:
        ok, frame = cap.read()
        if not ok:
            break
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)  # per frame, as the tutorial
        model = models.build_model(ckpt["config"])
        model.load_state_dict(ckpt["model"])
        for d in detector(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB), 1):
            l, t, r, b = [int(v) for v in utils.clamp_box([d.left(), d.top(), d.right(), d.bottom()],
                                                          frame.shape[1], frame.shape[0])]
            face = cv2.resize(frame[t:b, l:r], (256, 256))
            warped, _ = train.random_warp(face, rng, 64)
            with torch.no_grad():
                out = utils.to_images(model(utils.to_tensor(warped[None]), "b"))[0]
            out = cv2.resize(out, (r - l, b - t))
            mask = np.full(out.shape, 255, np.uint8)
            frame = cv2.seamlessClone(out, frame, mask, ((l + r) // 2, (t + b) // 2), cv2.NORMAL_CLONE)
        writer.write(cv2.resize(frame, (1920, 1080)))
        frames += 1
    writer.release()
    return frames


def run(frames=150, tutorial_frames=15, clips=None):
    require_data()
    clips = clips or CLIPS_256 + CLIPS_512
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_checkpoint(tmp / "model")
        for clip in clips:
            t = time.perf_counter()
            n_tut = tutorial_convert(VIDEOS / clip, tmp / "model" / models.CHECKPOINT, tmp / "tut.avi", tutorial_frames)
            tut_fps = n_tut / (time.perf_counter() - t)
            t = time.perf_counter()
            convert_video.main(["--video-path", str(VIDEOS / clip), "--model-dir", str(tmp / "model"),
                                "--output-path", str(tmp / "ours.mp4"), "--max-frames", str(frames), "--overwrite"])
            seconds = time.perf_counter() - t
            n_ours = utils.video_info(tmp / "ours.mp4")["frames"]  # a clip may be shorter than --frames
            ours_fps = n_ours / seconds
            rows.append(dict(clip=clip, frames=n_ours, ours_fps=round(ours_fps, 2), tutorial_fps=round(tut_fps, 3),
                             tutorial_frames=n_tut, speedup=round(ours_fps / tut_fps, 1)))
    return dict(benchmark="convert", model="original", clips=rows,
                note="tutorial loop timed without its 2 s sleep per frame; ours includes start-up and model load")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=150, help="frames per clip for convert_video.py")
    p.add_argument("--tutorial-frames", type=int, default=15, help="frames per clip for the slow tutorial loop")
    p.add_argument("--out", default=None, help="write the JSON here too")
    a = p.parse_args()
    report(run(a.frames, a.tutorial_frames), a.out)
