"""Benchmark crop_face.py (frames/s) against the tutorial's way: a per-frame dlib loop at upsample 1.

Both run in this process's run on the same frames of real clips from ../shared/data.
    python benchmarks/bench_crop_face.py --frames 150 --naive-frames 40 --out bench_out/crop_face.json
"""
import argparse
import tempfile
from pathlib import Path

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


def bench_clip(clip, frames, naive_frames, workers):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        crop_from_video.main(["--video-path", str(VIDEOS / clip), "--save-dir", str(tmp / "frames"),
                              "--max-frames", str(frames)])
        paths = utils.list_images(tmp / "frames")
        (tmp / "naive").mkdir()
        found, t_naive = timed(naive_crop, paths[:naive_frames], tmp / "naive")
        _, t_ours = timed(crop_face.main, ["--images-dir", str(tmp / "frames"), "--faces-dir", str(tmp / "faces"),
                                            "--workers", str(workers)])
        faces = {name: [r for r in frame["faces"] if r["kept"] is True] for name, frame in
                 utils.read_json(tmp / "faces" / utils.ALIGNMENTS_NAME)["frames"].items()}
        ours_fps, naive_fps = len(paths) / t_ours, min(naive_frames, len(paths)) / t_naive
        return dict(clip=clip, frames=len(paths), ours_fps=round(ours_fps, 2), naive_fps=round(naive_fps, 2),
                    speedup=round(ours_fps / naive_fps, 2),
                    ours_detection_rate=round(sum(1 for r in faces.values() if r) / len(faces), 4),
                    naive_detection_rate=round(found / min(naive_frames, len(paths)), 4))


def run(frames=150, naive_frames=40, workers=crop_face.WORKERS, clips=None):
    require_data()
    clips = clips or CLIPS_256 + CLIPS_512
    rows = [bench_clip(c, frames, naive_frames, workers) for c in clips]
    return dict(benchmark="crop_face", workers=workers, clips=rows)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=150, help="frames per clip for crop_face.py")
    p.add_argument("--naive-frames", type=int, default=40, help="frames per clip for the slow naive loop")
    p.add_argument("--workers", type=int, default=crop_face.WORKERS)
    p.add_argument("--out", default=None, help="write the JSON here too")
    a = p.parse_args()
    report(run(a.frames, a.naive_frames, a.workers), a.out)
