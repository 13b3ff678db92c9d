"""Measure how good a swap is: identity, expression kept, reconstruction, flicker.

Reads the converted video (CONVERTED_PATH) and the video it was made from
(SOURCE_PATH), the aligned face folders of both people (FACES_A, FACES_B) for
reference identities, and optionally held-out aligned faces the model never
trained on (HELDOUT_A, HELDOUT_B) with the model (MODEL_DIR). Writes
OUT_DIR/evaluation.json and OUT_DIR/contact_sheet.png and prints a table:

  identity     dlib face-recognition ResNet embeddings of the face in each converted frame,
               compared with the mean embedding of A's and of B's faces: the share of frames
               closer to B than to A (ID retrieval) and the mean distances (same person < 0.6)
  expression   68-landmark error between source and converted frame / inter-ocular distance
  reconstruct  A->A and B->B on held-out faces: L1, PSNR (dB), SSIM
  flicker      mean frame-to-frame change inside the face box, converted / source

Example:
    python evaluate.py --converted-path output/swapped.mp4 --source-path data/personA.mp4 \
        --faces-a train/personA_face --faces-b train/personB_face --model-dir models
"""
import argparse
from pathlib import Path

import cv2
import numpy as np
import torch
from tqdm import tqdm

import models
import utils

CONVERTED_PATH = Path("output/swapped.mp4")  # convert_video.py's output
SOURCE_PATH = Path("data/personA.mp4")       # the video it was made from
FACES_A = Path("train/personA_face")         # reference faces of A (identity)
FACES_B = Path("train/personB_face")         # reference faces of B
HELDOUT_A = None                             # aligned faces of A never trained on (reconstruction)
HELDOUT_B = None
MODEL_DIR = Path("models")
OUT_DIR = Path("output")
REFERENCE_FACES = 40                         # faces per person for the reference embedding


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--converted-path", type=Path, default=CONVERTED_PATH, help="converted video (or folder)")
    p.add_argument("--source-path", type=Path, default=SOURCE_PATH, help="the video it was converted from")
    p.add_argument("--faces-a", type=Path, default=FACES_A, help="aligned faces of A (reference identity)")
    p.add_argument("--faces-b", type=Path, default=FACES_B, help="aligned faces of B (reference identity)")
    p.add_argument("--heldout-a", type=Path, default=HELDOUT_A, help="held-out aligned faces of A")
    p.add_argument("--heldout-b", type=Path, default=HELDOUT_B, help="held-out aligned faces of B")
    p.add_argument("--model-dir", type=Path, default=MODEL_DIR, help="train.py's folder (reconstruction)")
    p.add_argument("--out-dir", type=Path, default=OUT_DIR, help="evaluation.json and contact_sheet.png go here")
    p.add_argument("--every", type=utils.positive_int, default=1, help="evaluate every Nth frame")
    p.add_argument("--max-frames", type=utils.non_negative_int, default=0, help="at most N frames (0 = all)")
    p.add_argument("--direction", choices=["a2b", "b2a"], default="a2b", help="which way the video was swapped")
    return p.parse_args(argv)


# ---------------------------------------------------------------- metric functions


def landmark_error(source, converted):
    """Mean landmark distance / inter-ocular distance (outer eye corners) of the source."""
    source, converted = np.asarray(source, float), np.asarray(converted, float)
    return float(np.linalg.norm(source - converted, axis=1).mean() / utils.inter_ocular(source))


def face_box(landmarks, shape, pad=0.1):
    l, t = np.min(landmarks, 0)
    r, b = np.max(landmarks, 0)
    pw, ph = (r - l) * pad, (b - t) * pad
    return (int(max(0, t - ph)), int(min(shape[0], b + ph)), int(max(0, l - pw)), int(min(shape[1], r + pw)))


def frame_change(previous, current, box):
    """Mean absolute change between two frames inside a face box (t, b, l, r)."""
    t, b, l, r = box
    return float(np.abs(current[t:b, l:r].astype(np.float32) - previous[t:b, l:r]).mean())


def psnr(x, y):
    """PSNR in dB of two uint8 or [0, 1] float arrays; inf when identical."""
    peak = 255.0 if np.asarray(x).dtype == np.uint8 else 1.0
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    mse = np.mean((x - y) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(peak ** 2 / mse))


def reconstruction(model, faces, side, batch=32):
    """L1, PSNR (dB) and SSIM of model(face, side) against the un-augmented face view."""
    size = model.input_size
    views = utils.to_tensor(np.stack([utils.center_face(f, size) for f in faces]))
    outs = []
    with torch.no_grad():
        for i in range(0, len(views), batch):
            outs.append(model(views[i:i + batch], side).float())
    out = torch.cat(outs)
    return dict(l1=round(float((out - views).abs().mean()), 5),
                psnr=round(psnr(out.numpy(), views.numpy()), 3),
                ssim=round(float(utils.ssim(out, views)), 4), faces=len(faces))


def reference_embedding(embedder, analyzer, folder, count):
    """Mean embedding of up to `count` faces spread over an aligned-face folder."""
    paths = utils.list_images(folder) if Path(folder).is_dir() else []
    if not paths:
        raise utils.UserError(f"no face images in {folder} (needed for the reference identity)")
    picks = [paths[i] for i in np.linspace(0, len(paths) - 1, min(count, len(paths))).round().astype(int)]
    embeddings = []
    for p in picks:
        image = utils.read_image(p)
        found = analyzer.analyze(image) if image is not None else []
        if found:
            embeddings.append(embedder.embed(image, found[0][1]))
    if not embeddings:
        raise utils.UserError(f"no face found again in the images of {folder}")
    return np.mean(embeddings, 0)


def read_frames(path, every, max_frames):
    for i, frame in enumerate(utils.read_video(path)):
        if max_frames and i >= max_frames:
            break
        yield i, frame, i % every == 0


def contact_sheet(pairs, path, height=160):
    """Source (top) over swapped (bottom) for a few frames, as one PNG."""
    cols = []
    for src, dst in pairs:
        scale = height / src.shape[0]
        size = (int(src.shape[1] * scale), height)
        cols.append(np.vstack([cv2.resize(src, size), cv2.resize(dst, size)]))
    utils.write_image(path, np.hstack(cols))


# ---------------------------------------------------------------- main


def run(args):
    utils.print_settings(args, "evaluate.py")
    for path, what in ((args.converted_path, "converted video"), (args.source_path, "source video")):
        if not path.exists():
            raise utils.UserError(f"{what} not found: {path}")
    out_dir = utils.ensure_writable_dir(args.out_dir)
    analyzer = utils.FaceAnalyzer()
    embedder = utils.FaceEmbedder()
    ref_a = reference_embedding(embedder, analyzer, args.faces_a, REFERENCE_FACES)
    ref_b = reference_embedding(embedder, analyzer, args.faces_b, REFERENCE_FACES)
    target, other = (ref_b, ref_a) if args.direction == "a2b" else (ref_a, ref_b)
    dist_target, dist_other, lm_errors, changes_src, changes_dst, pairs = [], [], [], [], [], []
    prev = None
    n_frames = n_missing = 0
    converted = read_frames(args.converted_path, 1, args.max_frames)
    for (i, src, use), (_, dst, _) in tqdm(zip(read_frames(args.source_path, args.every, args.max_frames),
                                               converted), desc="evaluating", unit="frame"):
        n_frames += 1
        if src.shape != dst.shape:
            raise utils.UserError(f"frame {i}: converted {dst.shape[1]}x{dst.shape[0]} differs from source "
                                  f"{src.shape[1]}x{src.shape[0]} (side-by-side output cannot be evaluated)")
        found_src = analyzer.analyze(src)
        if not found_src:
            prev = None
            continue
        box = face_box(found_src[0][1], src.shape)
        if prev is not None:
            changes_src.append(frame_change(prev[0], src, box))
            changes_dst.append(frame_change(prev[1], dst, box))
        prev = (src, dst)
        if not use:
            continue
        found_dst = analyzer.analyze(dst)
        if not found_dst:
            n_missing += 1
            continue
        emb = embedder.embed(dst, found_dst[0][1])
        dist_target.append(float(np.linalg.norm(emb - target)))
        dist_other.append(float(np.linalg.norm(emb - other)))
        lm_errors.append(landmark_error(found_src[0][1], found_dst[0][1]))
        if len(pairs) < 8 and i % max(1, 15 * args.every) == 0:
            pairs.append((src, dst))
    if not dist_target:
        raise utils.UserError("no face found in any converted frame; nothing to evaluate")
    dt, do = np.array(dist_target), np.array(dist_other)
    names = ("B", "A") if args.direction == "a2b" else ("A", "B")
    result = dict(
        frames=n_frames, frames_evaluated=len(dt), converted_frames_without_face=n_missing,
        identity={f"id_retrieval_closer_to_{names[0]}": round(float((dt < do).mean()), 4),
                  f"mean_distance_to_{names[0]}": round(float(dt.mean()), 4),
                  f"mean_distance_to_{names[1]}": round(float(do.mean()), 4),
                  f"share_within_0.6_of_{names[0]}": round(float((dt < 0.6).mean()), 4),
                  "reference_a_to_b_distance": round(float(np.linalg.norm(ref_a - ref_b)), 4)},
        expression=dict(landmark_error_over_inter_ocular=round(float(np.mean(lm_errors)), 4)),
        flicker=dict(source_mean_change=round(float(np.mean(changes_src)), 3) if changes_src else None,
                     converted_mean_change=round(float(np.mean(changes_dst)), 3) if changes_dst else None,
                     ratio=round(float(np.mean(changes_dst) / max(1e-9, np.mean(changes_src))), 3)
                     if changes_src else None))
    if args.heldout_a or args.heldout_b:
        model, _ = models.load_model(args.model_dir / models.CHECKPOINT)
        result["reconstruction"] = {}
        for folder, side in ((args.heldout_a, "a"), (args.heldout_b, "b")):
            if folder:
                faces = utils.load_faces(folder, quiet=True)
                result["reconstruction"][f"{side.upper()}->{side.upper()}"] = reconstruction(model, faces, side)
    if pairs:
        contact_sheet(pairs, out_dir / "contact_sheet.png")
    utils.write_json(out_dir / "evaluation.json", dict(result, settings=utils.settings_dict(args)))
    print_table(result)
    print(f"wrote {out_dir / 'evaluation.json'} and {out_dir / 'contact_sheet.png'}")
    return result


def print_table(result):
    print(f"\n{'metric':<44} value")
    print("-" * 56)
    for group in ("identity", "expression", "flicker", "reconstruction"):
        for key, value in result.get(group, {}).items():
            if isinstance(value, dict):
                value = ", ".join(f"{k} {v}" for k, v in value.items())
            print(f"{group + '.' + key:<44} {value}")
    print(f"{'frames evaluated':<44} {result['frames_evaluated']} of {result['frames']}")


def main(argv=None):
    args = parse_args(argv)
    with utils.user_errors():
        run(args)
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
