"""Benchmark crop_face.py (frames/s) with faces followed between frames, against detection in every frame
and against the tutorial's way (a per-frame dlib loop at upsample 1), and check that following loses nothing.

In one run, on the same frames of real clips from ../shared/data:
  speed      crop_face.py as it runs by default (the detector every --redetect-every frames, landmarks in
             every frame), the same with --redetect-every 1 (detection in every frame), and the tutorial's loop
  quality    on every clip given: frames with a face kept, and eye-centre wander (mean distance of each face's
             eye centres in the aligned face from their clip mean, px of the 256 face) for both modes

    python benchmarks/bench_crop_face.py --frames 300 --naive-frames 40 --out bench_out/crop_face.json
    python benchmarks/bench_crop_face.py --quality-only --clips all     # faces found and wander on every clip
    python benchmarks/bench_crop_face.py --png --frames 100              # + how utils.PNG_PARAMS write and read
    python benchmarks/bench_crop_face.py --frames 0 --before 668597d     # + an earlier commit's crop_face.py:
        this checkout's and that commit's crop_face.py, each as a whole process (start-up included)
"""
import argparse
import contextlib
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

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
import crop_face
import crop_from_video
import records
import utils


def naive_crop(frames, out_dir):
    """The tutorial's crop: dlib HOG at upsample 1 on the full frame, raw box crop resized to 256."""
    import cv2
    import dlib

    detector = dlib.get_frontal_face_detector()
    found = 0
    for path in frames:
        image = cv2.imread(str(path))
        rgb = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
        for k, d in enumerate(detector(rgb, 1)):
            l, t, r, b = align.clamp_box([d.left(), d.top(), d.right(), d.bottom()], *image.shape[1::-1])
            crop = cv2.resize(image[int(t):int(b), int(l):int(r)], (256, 256))
            cv2.imwrite(str(out_dir / f"{path.stem}_{k}.png"), crop)
            found += 1
    return found


def kept_faces(faces_dir):
    record = utils.read_json(faces_dir / records.ALIGNMENTS_NAME)["frames"]
    return {name: [r for r in frame["faces"] if r["kept"] is True] for name, frame in record.items()}


def wander(faces):
    """Mean distance (px of the aligned face) of each face's eye centres from their mean over the clip."""
    eyes = np.array([np.concatenate(align.eye_centres(align.transform_points(r["landmarks"], r["matrix"])))
                     for recs in faces.values() for r in recs[:1]])
    return float(np.linalg.norm((eyes - eyes.mean(0)).reshape(-1, 2, 2), axis=2).max(1).mean()) if len(eyes) else None


def png_figures(paths, repeats=3):
    """ms to write and to read, KiB, of these images as PNG with OpenCV's defaults and with utils.PNG_PARAMS."""
    import cv2

    images = [utils.read_image(p) for p in paths]
    out = {}
    for name, params in (("default", []), ("ours", utils.PNG_PARAMS)):
        for _ in range(repeats):  # the last repeat counts (caches warm)
            buffers, write_s = timed(lambda: [cv2.imencode(".png", im, params)[1] for im in images])
            _, read_s = timed(lambda: [cv2.imdecode(b, cv2.IMREAD_COLOR) for b in buffers])
        out[name] = dict(write_ms=round(1000 * write_s / len(images), 2), read_ms=round(1000 * read_s / len(images), 2),
                         kib=round(sum(b.size for b in buffers) / len(images) / 1024, 1))
    return out


def process_run(k, script, frames_dir, faces_dir, workers):
    """One crop_face.py process on a folder of frames, start to finish."""
    subprocess.run([sys.executable, str(script), "--images-dir", str(frames_dir), "--faces-dir", f"{faces_dir}{k}",
                    "--workers", str(workers)], check=True, capture_output=True)


def in_process_run(k, frames_dir, faces_dir, workers, extra):
    crop_face.main(["--images-dir", str(frames_dir), "--faces-dir", str(faces_dir), "--workers", str(workers),
                    "--overwrite", *extra])


def bench_clip(clip, frames, naive_frames, workers, speed=True, png=False, before=None, repeats=1):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        crop_from_video.main(["--video-path", str(VIDEOS / clip), "--save-dir", str(tmp / "frames"),
                              "--max-frames", str(frames)])
        paths = utils.list_images(tmp / "frames")
        row = dict(clip=clip, frames=len(paths))
        for mode, extra in (("followed", []), ("every_frame", ["--redetect-every", "1"])):
            seconds = fastest(repeats, in_process_run, tmp / "frames", tmp / mode, workers, extra)
            faces = kept_faces(tmp / mode)
            row.update({f"{mode}_fps": round(len(paths) / seconds, 2),
                        f"{mode}_frames_with_face": sum(1 for recs in faces.values() if recs),
                        f"{mode}_eye_wander_px": round(wander(faces), 3) if wander(faces) is not None else None})
        if before is not None:
            ours, then = (len(paths) / fastest(repeats, process_run, script, tmp / "frames", tmp / name, workers)
                          for script, name in ((ROOT / "crop_face.py", "ours"), (before / "crop_face.py", "before")))
            row.update(process_fps=round(ours, 2), before_process_fps=round(then, 2),
                       speedup_vs_before=round(ours / then, 2))
        if png:
            row.update(png_frames=png_figures(paths[:100]),
                       png_faces=png_figures(utils.list_images(tmp / "followed")[:100]))
        if speed:
            (tmp / "naive").mkdir()
            t_naive = fastest(repeats, lambda k: naive_crop(paths[:naive_frames], tmp / "naive"))
            naive_fps = min(naive_frames, len(paths)) / t_naive
            row.update(naive_fps=round(naive_fps, 2), speedup_vs_naive=round(row["followed_fps"] / naive_fps, 2),
                       speedup_vs_every_frame=round(row["followed_fps"] / row["every_frame_fps"], 2))
        return row


def run(frames=150, naive_frames=40, workers=crop_face.WORKERS, clips=None, quality_only=False, png=False,
        before=None, repeats=1):
    require_data()
    clips = clips or CLIPS_256 + CLIPS_512
    with tempfile.TemporaryDirectory() as tmp, \
            (checkout(before, Path(tmp) / "before") if before else contextlib.nullcontext()) as old:
        rows = [bench_clip(c, frames, naive_frames, workers, speed=not quality_only, png=png, before=old,
                           repeats=repeats)
                for c in clips]
    return dict(benchmark="crop_face", workers=workers, before_commit=before, repeats=repeats, clips=rows,
                note="each time is the fastest of `repeats` runs")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=150, help="frames per clip for crop_face.py")
    p.add_argument("--naive-frames", type=int, default=40, help="frames per clip for the slow naive loop")
    p.add_argument("--workers", type=int, default=crop_face.WORKERS)
    p.add_argument("--clips", nargs="+", default=None, help="clip file names, or 'all' for every clip")
    p.add_argument("--quality-only", action="store_true", help="faces found and wander only (no timing)")
    p.add_argument("--png", action="store_true", help="also time PNG writing and reading of frames and faces")
    p.add_argument("--before", default=None, metavar="COMMIT",
                   help="also time this commit's crop_face.py, and this checkout's, each as a whole process")
    p.add_argument("--repeats", type=int, default=1, help="time each run this many times and keep the fastest")
    p.add_argument("--out", default=None, help="write the JSON here too")
    a = p.parse_args()
    clips = sorted(p.name for p in VIDEOS.iterdir()) if a.clips == ["all"] else a.clips
    report(run(a.frames, a.naive_frames, a.workers, clips, a.quality_only, a.png, a.before, a.repeats), a.out)
