"""Step 2: find, align and save the faces in a folder of frames.

For every image in IMAGES_DIR: detect faces with dlib (HOG by default, CNN by
flag) on a downscaled copy, find 68 landmarks at full resolution, and align
each face with a similarity (Umeyama) fit of landmarks 17..67 to a mean-face
template, so the template fills the central 160 px of a 256x256 face, the
region train.py's augmentation uses. Writes FACES_DIR/<frame>_<k>.png and
FACES_DIR/alignments.json (per face: source frame, box, 68 landmarks in frame
pixels, the 2x3 frame->face matrix). Faces can be deleted by hand before
training; train.py uses whatever images are left.

Re-running on the same frames resumes: frames already in alignments.json are
skipped. A folder holding faces of other frames is never mixed into.

Example:
    python crop_face.py --images-dir train/personA --faces-dir train/personA_face
Tiny run:
    python crop_face.py --images-dir /tmp/frames --faces-dir /tmp/faces --workers 1
"""
import argparse
import multiprocessing as mp
import os
from pathlib import Path

from tqdm import tqdm

import utils

IMAGES_DIR = Path("train/personA")      # frames from crop_from_video.py
FACES_DIR = Path("train/personA_face")  # aligned 256x256 faces + alignments.json
WORKERS = max(1, (os.cpu_count() or 1))  # detection processes


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--images-dir", type=Path, default=IMAGES_DIR, help="folder of frames")
    p.add_argument("--faces-dir", type=Path, default=FACES_DIR, help="output folder for aligned faces")
    utils.add_detector_args(p)
    p.add_argument("--all-faces", action="store_true", help="keep every face in a frame, not only the largest")
    p.add_argument("--size", type=utils.positive_int, default=utils.FACE_SIZE, help="size of the saved faces in pixels")
    p.add_argument("--workers", type=utils.positive_int, default=WORKERS, help="detection processes")
    p.add_argument("--overwrite", action="store_true", help="replace faces already in --faces-dir")
    return p.parse_args(argv)


def process_frame(task):
    """Detect, align and save the faces of one frame; returns (frame name, face records or None if unreadable)."""
    path, faces_dir, all_faces, size = task
    image = utils.read_image(path)
    if image is None:
        return path.name, None
    records = []
    for k, (box, landmarks) in enumerate(utils.worker_analyzer().analyze(image, all_faces)):
        matrix = utils.align_matrix(landmarks, size)
        face_name = f"{path.stem}_{k}.png"
        utils.write_image(Path(faces_dir) / face_name, utils.warp_face(image, matrix, size))
        records.append(dict(frame=path.name, face=face_name, box=[round(v, 2) for v in box],
                            landmarks=landmarks.round(2).tolist(), matrix=matrix.round(6).tolist()))
    return path.name, records


def load_previous(faces_dir, images_dir, size, overwrite):
    """Face records of an earlier run on the same frames (to resume), or {} for a fresh start."""
    path = faces_dir / utils.ALIGNMENTS_NAME
    existing = utils.list_images(faces_dir)
    if overwrite:
        for p in existing:
            p.unlink()
        return {}
    if path.exists():
        data = utils.read_json(path)
        if data.get("images_dir") == str(images_dir.resolve()) and data.get("size") == size:
            return {name: recs for name, recs in data.get("frames", {}).items()}
    if existing:
        raise utils.UserError(f"{faces_dir} already holds {len(existing)} faces from other frames; "
                              "choose another --faces-dir or pass --overwrite to replace them")
    return {}


def run(args):
    utils.print_settings(args, "crop_face.py")
    if not args.images_dir.is_dir():
        raise utils.UserError(f"frames folder not found: {args.images_dir} (run crop_from_video.py first)")
    frames = utils.list_images(args.images_dir)
    if not frames:
        raise utils.UserError(f"no images in {args.images_dir}")
    faces_dir = utils.ensure_writable_dir(args.faces_dir)
    # Load models once here so a bad --landmarks-model fails before any work starts.
    init = utils.detector_settings(args)
    utils.init_worker_analyzer(*init)
    done = load_previous(faces_dir, args.images_dir, args.size, args.overwrite)
    todo = [p for p in frames if p.name not in done]
    if done:
        print(f"resuming: {len(done)} frames already processed, {len(todo)} to go")
    tasks = [(p, faces_dir, args.all_faces, args.size) for p in todo]
    results = dict(done)
    unreadable = []

    def save():
        utils.write_json(faces_dir / utils.ALIGNMENTS_NAME, dict(
            images_dir=str(args.images_dir.resolve()), size=args.size, coverage=utils.FACE_COVERAGE,
            detector=args.detector, settings=utils.settings_dict(args), frames=dict(sorted(results.items()))))

    workers = max(1, min(args.workers, len(tasks)))
    pool = mp.get_context("spawn").Pool(workers, utils.init_worker_analyzer, init) if workers > 1 else None
    try:
        stream = pool.imap(process_frame, tasks, chunksize=8) if pool else map(process_frame, tasks)
        for n, (name, records) in enumerate(tqdm(stream, total=len(tasks), unit="frame", desc="faces")):
            if records is None:
                unreadable.append(name)
                tqdm.write(f"warning: skipped unreadable image {name}")
                continue
            results[name] = records
            if n % 500 == 499:
                save()  # a crash or Ctrl-C loses at most a few hundred frames
    finally:
        if pool:
            pool.terminate()
        save()
    n_faces = sum(len(r) for r in results.values())
    no_face = sorted(name for name, r in results.items() if not r)
    print(f"{len(results)} frames: {n_faces} faces saved to {faces_dir}, "
          f"{len(no_face)} frames without a face, {len(unreadable)} unreadable")
    if no_face:
        print(f"  no face in: {', '.join(no_face[:10])}{' ...' if len(no_face) > 10 else ''}")
    if n_faces == 0:
        raise utils.UserError(f"no faces found in {args.images_dir}; try --detector cnn or --upsample 1")
    return 0


def main(argv=None):
    args = parse_args(argv)
    with utils.user_errors():
        return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
