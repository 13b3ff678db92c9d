"""Benchmark crop_face.py (frames/s) with faces followed between frames, against detection in every frame
and against the tutorial's way (a per-frame dlib loop at upsample 1), and check that following loses nothing.

In one run, on the same frames of real clips from ../shared/data:
  speed      crop_face.py as it runs by default (the detector every --redetect-every frames, landmarks in
             every frame), the same with --redetect-every 1 (detection in every frame), and the tutorial's loop
  quality    on every clip given: frames with a face kept, and eye-centre wander (mean distance of each face's
             eye centres in the aligned face from their clip mean, px of the 256 face) for both modes

    python benchmarks/bench_crop_face.py --frames 300 --naive-frames 40 --out bench_out/crop_face.json
    python benchmarks/bench_crop_face.py --quality-only --clips all     # faces found and wander on every clip
"""
import argparse
import tempfile
from pathlib import Path

import numpy as np
from common import CLIPS_256, CLIPS_512, VIDEOS, report, require_data, timed

import crop_face
import crop_from_video
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
            l, t, r, b = utils.clamp_box([d.left(), d.top(), d.right(), d.bottom()], *image.shape[1::-1])
            crop = cv2.resize(image[int(t):int(b), int(l):int(r)], (256, 256))
            cv2.imwrite(str(out_dir / f"{path.stem}_{k}.png"), crop)
            found += 1
    return found


def kept_faces(faces_dir):
    record = utils.read_json(faces_dir / utils.ALIGNMENTS_NAME)["frames"]
    return {name: [r for r in frame["faces"] if r["kept"] is True] for name, frame in record.items()}


def wander(faces):
    """Mean distance (px of the aligned face) of each face's eye centres from their mean over the clip."""
    eyes = np.array([np.concatenate(utils.eye_centres(utils.transform_points(r["landmarks"], r["matrix"])))
                     for recs in faces.values() for r in recs[:1]])
    return float(np.linalg.norm((eyes - eyes.mean(0)).reshape(-1, 2, 2), axis=2).max(1).mean()) if len(eyes) else None


def bench_clip(clip, frames, naive_frames, workers, speed=True):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        crop_from_video.main(["--video-path", str(VIDEOS / clip), "--save-dir", str(tmp / "frames"),
                              "--max-frames", str(frames)])
        paths = utils.list_images(tmp / "frames")
        row = dict(clip=clip, frames=len(paths))
        for mode, extra in (("followed", []), ("every_frame", ["--redetect-every", "1"])):
            _, seconds = timed(crop_face.main, ["--images-dir", str(tmp / "frames"), "--faces-dir",
                                                str(tmp / mode), "--workers", str(workers), *extra])
            faces = kept_faces(tmp / mode)
            row.update({f"{mode}_fps": round(len(paths) / seconds, 2),
                        f"{mode}_frames_with_face": sum(1 for recs in faces.values() if recs),
                        f"{mode}_eye_wander_px": round(wander(faces), 3) if wander(faces) is not None else None})
        if speed:
            (tmp / "naive").mkdir()
            found, t_naive = timed(naive_crop, paths[:naive_frames], tmp / "naive")
            naive_fps = min(naive_frames, len(paths)) / t_naive
            row.update(naive_fps=round(naive_fps, 2), speedup_vs_naive=round(row["followed_fps"] / naive_fps, 2),
                       speedup_vs_every_frame=round(row["followed_fps"] / row["every_frame_fps"], 2))
        return row


def run(frames=150, naive_frames=40, workers=crop_face.WORKERS, clips=None, quality_only=False):
    require_data()
    clips = clips or CLIPS_256 + CLIPS_512
    rows = [bench_clip(c, frames, naive_frames, workers, speed=not quality_only) for c in clips]
    return dict(benchmark="crop_face", workers=workers, clips=rows)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=150, help="frames per clip for crop_face.py")
    p.add_argument("--naive-frames", type=int, default=40, help="frames per clip for the slow naive loop")
    p.add_argument("--workers", type=int, default=crop_face.WORKERS)
    p.add_argument("--clips", nargs="+", default=None, help="clip file names, or 'all' for every clip")
    p.add_argument("--quality-only", action="store_true", help="faces found and wander only (no timing)")
    p.add_argument("--out", default=None, help="write the JSON here too")
    a = p.parse_args()
    clips = sorted(p.name for p in VIDEOS.iterdir()) if a.clips == ["all"] else a.clips
    report(run(a.frames, a.naive_frames, a.workers, clips, a.quality_only), a.out)
