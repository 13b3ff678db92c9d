"""Benchmark convert_video.py end to end (frames/s) against the code before tracking and the tutorial's loop.

In one run, on the same real clips, each as a fresh process timed from start to finish (start-up,
model loading, decoding, finding faces, the model, blending, encoding):
  ours       this checkout's convert_video.py (faces followed between detections), with the `original`
             model (the default at BASELINE_COMMIT), with train.py's default model today (`tiny`) and with
             the 128 px `lite128`
  before     convert_video.py of BASELINE_COMMIT (detection in every frame), `original` model
  tutorial   the tutorial's loop, as ../shared/REFERENCE.md describes it, minus its 2 s sleep per frame:
             for every frame it rebuilds the model and reloads the checkpoint, detects with dlib at
             upsample 1 on the full frame, crops the raw box, applies random_warp, runs decoder B,
             pastes with a full-rectangle seamlessClone and writes 1920x1080 MJPG
With the default model each side is also timed on one frame: that is its start-up (importing torch,
loading dlib's and the model, opening and closing the video), and (frames - 1) / (time - start-up) is
its rate on a long video, where the start-up no longer counts.
--stages also times each stage alone on each clip (decode, find faces, model, blend, encode): the profile.
--precision times only the model of each preset, fp32 against bf16 autocast, as convert_video.py runs it.
--blend times only the pasting of one face (paste_face, today's defaults) with --detail 0 and 1, per clip.

    python benchmarks/bench_convert.py --frames 150 --tutorial-frames 15 --out bench_out/convert.json
"""
import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from common import (
    CLIPS_256,
    CLIPS_512,
    ROOT,
    VIDEOS,
    checkout,
    fastest,
    report,
    require_data,
    timed,
)

import align
import blend
import faces
import models
import tensors
import train
import utils
import video

BASELINE_COMMIT = "a0118d6"  # the last commit before faces were followed between frames


def make_checkpoint(model_dir, preset, old_format=False):
    """A checkpoint of an untrained model (weights do not change the speed); old_format: the config keys the
    baseline commit knows."""
    torch.manual_seed(0)
    model = models.build_model(models.model_config(preset))
    state = train.checkpoint_state(model, train.make_optimizer(model, 5e-5), 0, 0.0, 0)
    if old_format:
        state["config"] = {k: v for k, v in state["config"].items()
                           if k in ("name", "input_size", "encoder_channels", "latent_dim", "decoder_channels")}
    model_dir.mkdir(parents=True, exist_ok=True)
    models.save_checkpoint(model_dir, state, is_best=False)
    return model_dir


def timed_convert(script, video, model_dir, out, frames, repeats=1):
    """frames/s of a convert_video.py process, start to finish (the fastest of `repeats`), and the frames written."""
    def once(_):
        subprocess.run([sys.executable, str(script), "--video-path", str(video), "--model-dir", str(model_dir),
                        "--output-path", str(out), "--max-frames", str(frames), "--overwrite"],
                       check=True, capture_output=True)
    seconds = fastest(repeats, once)
    n = video.video_info(out)["frames"]  # a clip may be shorter than --frames
    return n / seconds, n


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
            l, t, r, b = [int(v) for v in align.clamp_box([d.left(), d.top(), d.right(), d.bottom()],
                                                          frame.shape[1], frame.shape[0])]
            face = cv2.resize(frame[t:b, l:r], (256, 256))
            warped, _ = train.random_warp(face, rng, 64)
            with torch.no_grad():
                out = tensors.to_images(model(tensors.to_tensor(warped[None]), "b"))[0]
            out = cv2.resize(out, (r - l, b - t))
            mask = np.full(out.shape, 255, np.uint8)
            frame = cv2.seamlessClone(out, frame, mask, ((l + r) // 2, (t + b) // 2), cv2.NORMAL_CLONE)
        writer.write(cv2.resize(frame, (1920, 1080)))
        frames += 1
    writer.release()
    return frames


def stages(video, model_dir, frames):
    """Frames/s of each stage alone, one process, all cores: where the time goes."""
    images = [f for _, f in zip(range(frames), video.FrameSource(video))]
    rates = {}
    t = time.perf_counter()
    n = sum(1 for _ in zip(range(frames), video.FrameSource(video)))
    rates["decode"] = n / (time.perf_counter() - t)
    tracker = faces.FaceTracker(faces.FaceAnalyzer())
    t = time.perf_counter()
    found = [tracker(f.image) for f in images]
    rates["find_faces_1_core"] = len(images) / (time.perf_counter() - t)
    model, _ = models.load_model(model_dir / models.CHECKPOINT)
    model.to(memory_format=torch.channels_last)
    chosen = [[found[i][0][1]] if found[i] else [] for i in range(len(images))]
    settings = blend.BlendSettings()  # convert_video.py's blending defaults
    dtype = utils.pick_precision("auto", torch.device("cpu"))
    size = model.input_size
    crops = [align.warp_face(f.image, align.align_matrix(fl[0], size, 1.0), size) for f, fl in zip(images, chosen)
             if fl]
    t = time.perf_counter()
    with torch.no_grad(), utils.autocast(torch.device("cpu"), dtype):
        for k in range(0, len(crops), 16):
            model(tensors.to_tensor(np.stack(crops[k:k + 16])).contiguous(memory_format=torch.channels_last), "b")
    rates["model"] = len(crops) / (time.perf_counter() - t)
    t = time.perf_counter()
    out = [blend.paste_face(f.image, c, align.align_matrix(fl[0], size, 1.0), fl[0], settings)
           for f, fl, c in zip(images, chosen, crops) if fl]
    rates["blend_1_core"] = len(out) / (time.perf_counter() - t)
    with tempfile.TemporaryDirectory() as tmp:
        writer = video.VideoWriter(Path(tmp) / "x.mp4", 30, images[0].image.shape[1],
                                           images[0].image.shape[0])
        t = time.perf_counter()
        for f in images:
            writer.write(f.image)
        writer.close()
        rates["encode"] = len(images) / (time.perf_counter() - t)
    return {k: round(v, 1) for k, v in rates.items()}


def precision_rates(batches=(16, 64), presets=("tiny", "lite128", "original"), repeats=3):
    """ms per face of each preset's encoder + decoder B (channels-last, as convert_video.py runs them), in fp32
    and in bf16 autocast: the fastest of `repeats` timings of a few batches of random faces."""
    torch.manual_seed(0)
    rows = []
    for preset in presets:
        model = models.build_model(models.model_config(preset)).eval().to(memory_format=torch.channels_last)
        for batch in batches:
            x = torch.rand(batch, 3, model.input_size, model.input_size).contiguous(memory_format=torch.channels_last)
            row = dict(preset=preset, batch=batch)
            for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
                with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
                    model(x, "b")  # warm-up
                    best = fastest(repeats, lambda k: [model(x, "b") for _ in range(3)]) / 3
                row[f"{name}_ms_per_face"] = round(1000 * best / batch, 2)
            row["bf16_over_fp32"] = round(row["bf16_ms_per_face"] / row["fp32_ms_per_face"], 2)
            rows.append(row)
    return dict(benchmark="convert model precision", threads=torch.get_num_threads(),
                amx=utils.cpu_has_amx(), chosen_by_auto=str(utils.pick_precision("auto", torch.device("cpu"))),
                rows=rows)


def blend_rates(clips=None, repeats=3, n=40):
    """ms of one core to paste a face (a 64 px crop of the clip's first frame) with convert_video.py's defaults,
    with --detail 0 and 1: the fastest of `repeats` timings of n pastes each, the two settings interleaved."""
    require_data()
    analyzer = faces.FaceAnalyzer()  # dlib's models, loaded once
    settings = {detail: blend.BlendSettings(detail=detail) for detail in (0, 1)}
    rows = []
    for clip in clips or CLIPS_256 + CLIPS_512:
        frame = next(iter(video.FrameSource(VIDEOS / clip))).image
        landmarks = faces.FaceTracker(analyzer)(frame)[0][1]
        matrix = align.align_matrix(landmarks, 64, coverage=1.0)
        face = align.warp_face(frame, matrix, 64)
        best = dict.fromkeys(settings, float("inf"))
        for _ in range(repeats):
            for detail, chosen in settings.items():
                _, seconds = timed(lambda: [blend.paste_face(frame, face, matrix, landmarks, chosen)
                                            for _ in range(n)])
                best[detail] = min(best[detail], seconds / n)
        rows.append(dict(clip=clip, size=frame.shape[1], detail_0_ms=round(1000 * best[0], 2),
                         detail_1_ms=round(1000 * best[1], 2)))
    return dict(benchmark="convert blend per face", rows=rows)


def run(frames=150, tutorial_frames=15, clips=None, with_stages=False, before_commit=BASELINE_COMMIT, repeats=1):
    require_data()
    clips = clips or CLIPS_256 + CLIPS_512
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        with checkout(before_commit, tmp / "baseline") as baseline:
            original, lite = make_checkpoint(tmp / "original", "original"), make_checkpoint(tmp / "lite", "lite128")
            default = make_checkpoint(tmp / "default", train.MODEL)
            old = make_checkpoint(tmp / "old", "original", old_format=True)
            old_default = make_checkpoint(tmp / "old_default", train.MODEL, old_format=True)
            for clip in clips:
                video = VIDEOS / clip

                def convert_fps(root, model_dir, n=frames):
                    return timed_convert(root / "convert_video.py", video, model_dir, tmp / "out.mp4", n, repeats)[0]

                ours, n = timed_convert(ROOT / "convert_video.py", video, original, tmp / "ours.mp4", frames, repeats)
                ours_lite, ours_default = convert_fps(ROOT, lite), convert_fps(ROOT, default)
                before, before_default = convert_fps(baseline, old), convert_fps(baseline, old_default)
                startup = {}
                for name, root, model_dir, fps in (("ours", ROOT, default, ours_default),
                                                   ("before", baseline, old_default, before_default)):
                    one = convert_fps(root, model_dir, 1)
                    after = n / fps - 1 / one  # seconds of the other frames; noise can make it <= 0 on a short clip
                    startup[name] = (1 / one, (n - 1) / after if after > 0 else float("nan"))
                t = time.perf_counter()
                n_tut = tutorial_convert(video, original / models.CHECKPOINT, tmp / "tut.avi", tutorial_frames)
                tut = n_tut / (time.perf_counter() - t)
                row = dict(clip=clip, frames=n, ours_original_fps=round(ours, 2), before_original_fps=round(before, 2),
                           speedup_vs_before=round(ours / before, 2), ours_lite128_fps=round(ours_lite, 2),
                           default_model=train.MODEL, ours_default_fps=round(ours_default, 2),
                           default_speedup_vs_before=round(ours_default / before, 2),
                           before_default_fps=round(before_default, 2),
                           same_default_speedup_vs_before=round(ours_default / before_default, 2),
                           ours_default_startup_s=round(startup["ours"][0], 2),
                           before_default_startup_s=round(startup["before"][0], 2),
                           ours_default_fps_after_startup=round(startup["ours"][1], 2),
                           before_default_fps_after_startup=round(startup["before"][1], 2),
                           tutorial_fps=round(tut, 3), speedup_vs_tutorial=round(ours / tut, 1))
                if with_stages:
                    row["stages_original"] = stages(video, original, frames)
                    row["stages_lite128"] = stages(video, lite, frames)
                rows.append(row)
    return dict(benchmark="convert", baseline_commit=before_commit, clips=rows,
                repeats=repeats,
                note="each conversion timed as a whole process (start-up and model load included); the tutorial "
                     "loop without its 2 s sleep per frame; default_speedup_vs_before: ours with today's default "
                     "model over before with `original` (the default at a0118d6); same_default_speedup_vs_before: "
                     "both with today's default model")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=150, help="frames per clip for convert_video.py")
    p.add_argument("--tutorial-frames", type=int, default=15, help="frames per clip for the slow tutorial loop")
    p.add_argument("--stages", action="store_true", help="also time each stage alone (the profile)")
    p.add_argument("--precision", action="store_true", help="time only the models, fp32 against bf16")
    p.add_argument("--blend", action="store_true", help="time only the pasting of a face, --detail 0 against 1")
    p.add_argument("--before", default=BASELINE_COMMIT, metavar="COMMIT", help="the earlier commit to time beside")
    p.add_argument("--repeats", type=int, default=1, help="runs of each conversion; the fastest counts")
    p.add_argument("--out", default=None, help="write the JSON here too")
    a = p.parse_args()
    if a.precision or a.blend:
        report(precision_rates() if a.precision else blend_rates(), a.out)
    else:
        report(run(a.frames, a.tutorial_frames, with_stages=a.stages, before_commit=a.before, repeats=a.repeats),
               a.out)
