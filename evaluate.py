"""Measure how good a swap is: identity among many people, pose, sharpness, expression, flicker, reconstruction.

Reads the converted video (CONVERTED_PATH, or a folder of images) and the video it was
made from (SOURCE_PATH), the aligned face folders of both people (FACES_A, FACES_B) for
their reference identities, optionally a GALLERY of other people, and optionally
held-out aligned faces the model never trained on (HELDOUT_A, HELDOUT_B) with the model
(MODEL_DIR). Writes OUT_DIR/evaluation.json and OUT_DIR/contact_sheet.png (source over
converted: whole frames and the face at full size) and prints a table:

  identity     dlib's face-recognition ResNet embedding of the face in each converted frame
               against every identity at hand: A and B (mean embedding of their faces) and each
               person of --gallery. top-1 retrieval = share of frames whose nearest identity is
               the target (B for a2b); the target's rank (1 = nearest) and mean distance (same
               person < 0.6). The 2-person figure (closer to B than to A) is kept as a second line.
               With B's held-out faces, their mean distance to B's reference is the yardstick for
               that distance: how far a real, unseen face of B lies. Retrieval among few people can
               be won by a featureless face in B's colours; the distance tells it from a face of B.
               The transfer index puts the distance on a scale: 0 = as far from B as A's own
               (unswapped) face, 1 = as near B as B's held-out faces.
  pose         head yaw/pitch/roll of source and converted face (cv2.solvePnP of the 68 landmarks
               against a 3D mean face): mean absolute error in degrees
  sharpness    variance of the Laplacian inside the face (landmark hull, outline left out),
               converted / source: 1.0 = as much fine detail as the real face, blur lowers it.
               Pixel noise and sharpening raise it too, so it is also taken at the scale of the
               facial features (the face shrunk to FEATURE_SCALE px between the eyes): the edges of
               eyes, brows, nose and lips, which a featureless blob lacks however noisy it is.
               --noise-control measures each face again with noise added up to the source's fine
               detail: the feature-scale figure should not rise with it
  expression   68-landmark error between source and converted frame / inter-ocular distance, and how
               well the swap's mouth opens and closes with the source's (the correlation of the two)
  flicker      mean frame-to-frame change inside the face box, converted / source
  reconstruct  A->A and B->B on held-out faces: L1, PSNR (dB), SSIM, and SSIM inside the face; for these
               and the swaps (A->B, B->A) the fine detail drawn (as sharpness, in the model's view) and
               the contrast (grey variance), drawn / real. The conversion's colour transfer evens out
               the contrast, so a face drawn with more contrast, not finer, gains detail only here

A gallery is a folder of <person>/ subfolders holding photos, aligned faces or clips of
that person (symbolic links are fine); its embeddings are cached in <gallery>/.embeddings.json
and recomputed for a person only when that person's files change. --name-a/--name-b say
which gallery people are A and B (their own faces stand for them then).

Example:
    python evaluate.py --converted-path output/swapped.mp4 --source-path data/personA.mp4 \\
        --faces-a train/personA_face --faces-b train/personB_face --gallery gallery --model-dir models
"""
import argparse
from pathlib import Path

import cv2
import numpy as np
import torch
from tqdm import tqdm

import align
import faces
import models
import records
import tensors
import utils
import video

CONVERTED_PATH = Path("output/swapped.mp4")  # convert_video.py's output
SOURCE_PATH = Path("data/personA.mp4")       # the video it was made from
FACES_A = Path("train/personA_face")         # reference faces of A (identity)
FACES_B = Path("train/personB_face")         # reference faces of B
GALLERY = None                               # folder of <person>/ photos or clips: other identities
HELDOUT_A = None                             # aligned faces of A never trained on (reconstruction)
HELDOUT_B = None
MODEL_DIR = Path("models")
OUT_DIR = Path("output")
FEATURE_SCALE = 32                           # px between the outer eye corners for feature_scale sharpness
GALLERY_SAMPLES = 20                         # frames taken from each gallery clip


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--converted-path", type=Path, default=CONVERTED_PATH, help="converted video (or folder)")
    p.add_argument("--source-path", type=Path, default=SOURCE_PATH, help="the video (or folder) it was made from")
    p.add_argument("--faces-a", type=Path, nargs="+", default=[FACES_A], help="aligned faces of A (reference)")
    p.add_argument("--faces-b", type=Path, nargs="+", default=[FACES_B], help="aligned faces of B (reference)")
    p.add_argument("--gallery", type=Path, default=GALLERY, help="folder of <person>/ photos or clips")
    p.add_argument("--name-a", default=None, help="A's folder name in --gallery, if A is in it")
    p.add_argument("--name-b", default=None, help="B's folder name in --gallery, if B is in it")
    p.add_argument("--heldout-a", type=Path, nargs="+", default=HELDOUT_A, help="held-out aligned faces of A")
    p.add_argument("--heldout-b", type=Path, nargs="+", default=HELDOUT_B, help="held-out aligned faces of B")
    p.add_argument("--model-dir", type=Path, default=MODEL_DIR, help="train.py's folder (reconstruction)")
    p.add_argument("--checkpoint", default=models.CHECKPOINT, help="checkpoint file in --model-dir")
    p.add_argument("--out-dir", type=Path, default=OUT_DIR, help="evaluation.json and contact_sheet.png go here")
    p.add_argument("--every", type=utils.positive_int, default=1, help="evaluate every Nth frame")
    p.add_argument("--max-frames", type=utils.non_negative_int, default=0, help="at most N frames (0 = all)")
    p.add_argument("--direction", choices=["a2b", "b2a"], default="a2b", help="which way the video was swapped")
    p.add_argument("--noise-control", action="store_true",
                   help="also measure each converted face with pixel noise added up to the source's fine detail: "
                        "a control that detail figures must not reward (the feature-scale one should stay put)")
    faces.add_detector_args(p)
    return p.parse_args(argv)


# ---------------------------------------------------------------- metric functions


def landmark_error(source, converted):
    """Mean landmark distance / inter-ocular distance (outer eye corners) of the source."""
    source, converted = np.asarray(source, float), np.asarray(converted, float)
    return float(np.linalg.norm(source - converted, axis=1).mean() / align.inter_ocular(source))


def mouth_opening(landmarks):
    """The gap between the inner lips over the inter-ocular distance."""
    landmarks = np.asarray(landmarks, float)
    upper, lower = align.INNER_LIPS_MIDDLE
    return float(np.linalg.norm(landmarks[upper] - landmarks[lower]) / align.inter_ocular(landmarks))


def mouth_correlation(rows):
    """How well the swap's mouth follows the source's over the frames: the correlation of their openings (1 =
    in step; near 0 = a mouth of its own, whatever A says), None with fewer than 3 frames or a still mouth."""
    if len(rows) < 3:
        return None
    src, dst = np.array([r["mouth"] for r in rows]).T
    if src.std() < 1e-6 or dst.std() < 1e-6:
        return None
    return round(float(np.corrcoef(src, dst)[0, 1]), 4)


def pose_error(source_pose, converted_pose):
    """Absolute (yaw, pitch, roll) differences in degrees."""
    return np.abs(np.asarray(source_pose) - np.asarray(converted_pose))


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


def model_view_masks(landmarks, size, share=align.FACE_COVERAGE):
    """Face-hull masks (N, 1, size, size) in the model's view (the central `share`) of aligned faces; the mean face
    where unknown."""
    full = align.FACE_SIZE
    lo = full * (1 - share) / 2
    inner = size * align.FACE_COVERAGE / share  # the template's size in the view
    template = np.full((68, 2), np.nan)
    template[align.ALIGN_POINTS] = align.MEAN_FACE * inner + (size - inner) / 2
    masks = []
    for points in landmarks:
        points = (points - lo) * size / (full * share) if np.isfinite(points).all() else template[align.ALIGN_POINTS]
        masks.append(align.face_hull_mask(points, (size, size)))
    return torch.from_numpy(np.stack(masks)[:, None])


def reconstructions(model, heldout_a, heldout_b):
    """{"A->A": figures, "A->B": figures, "B->B": ..., "B->A": ...} of the held-out faces given: each side's own
    decoder (reconstruction) and the other's (the swap, detail only: it has no target to compare with)."""
    found = {}
    for folders, side, other in ((heldout_a, "a", "b"), (heldout_b, "b", "a")):
        if folders:
            images, landmarks = records.load_faces(folders, quiet=True)
            views, masks = model_views(images, landmarks, model.input_size, model.face_share)
            found[f"{side.upper()}->{side.upper()}"] = reconstruction(model, views, masks, side)
            found[f"{side.upper()}->{other.upper()}"] = reconstruction(model, views, masks, other, swap=True)
    return found


def model_views(images, landmarks, size, share=align.FACE_COVERAGE):
    """(views (N, 3, size, size), face-hull masks (N, 1, size, size)) of stored faces: what the model sees (the
    central `share` of each, model.face_share)."""
    views = tensors.to_tensor(np.stack([align.center_face(f, size, share) for f in images]))
    landmarks = np.full((len(images), 68, 2), np.nan) if landmarks is None else landmarks
    return views, model_view_masks(landmarks, size, share)


def reconstruction(model, views, masks, side, batch=32, swap=False):
    """model(views, side) against the views (model_views): L1, PSNR (dB), SSIM and SSIM inside the face (not for
    a swap), the detail it drew (view_detail), at the model's size and at half of it, and its contrast
    (view_contrast)."""
    outs = []
    with torch.no_grad():
        for i in range(0, len(views), batch):
            outs.append(model(views[i:i + batch], side)[:, :3].float())
    out = torch.cat(outs)
    figures = {} if swap else dict(l1=round(float((out - views).abs().mean()), 5),
                                   psnr=round(psnr(out.numpy(), views.numpy()), 3),
                                   ssim=round(float(tensors.ssim(out, views)), 4),
                                   ssim_face=round(float(tensors.ssim(out, views, mask=masks)), 4))
    return dict(figures, detail=view_detail(out, views, masks), detail_half=view_detail(out, views, masks, shrink=2),
                contrast=view_contrast(out, views, masks), faces=len(views))


def view_detail(drawn, real, masks, shrink=1):
    """The fine detail of faces a model drew against the real faces, in the model's view (N, 3, S, S), inside the
    face hulls (N, 1, S, S): align.sharpness (the Laplacian's variance) of the drawn / of the real, over all faces,
    at the model's size or averaged down by `shrink` (the outlines of eyes, nose and lips). The swap's figure
    against its B->B figure says how much of the softness is the swap's, not the decoder's."""
    if shrink > 1:
        drawn, real, masks = (torch.nn.functional.avg_pool2d(t.float(), shrink) for t in (drawn, real, masks))
    return hull_ratio(drawn, real, masks, lambda image, mask: align.sharpness(image, None, mask))


def view_contrast(drawn, real, masks):
    """The contrast of faces a model drew against the real faces, in the model's view inside the face hulls: the
    grey level's variance of the drawn / of the real, over all faces. A face drawn with k times the contrast reads
    k here and k in view_detail too; the colour transfer of the conversion (--color rct) matches the pasted face's
    spread to the replaced face's, so what a pasted face keeps of the detail is view_detail / view_contrast."""
    def variance(image, mask):
        return float(cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)[mask > 0.5].astype(np.float64).var())
    return hull_ratio(drawn, real, masks, variance)


def hull_ratio(drawn, real, masks, measure):
    """mean measure(drawn face, its hull) / mean measure(real face, its hull), over (N, 3, S, S) batches."""
    drawn_mean, real_mean = (np.mean([measure(image, m[0]) for image, m in zip(tensors.to_images(batch),
                                                                              masks.numpy())])
                             for batch in (drawn, real))
    return round(float(drawn_mean / max(real_mean, 1e-9)), 4)


def largest_face_embedding(image, analyzer, embedder):
    found = analyzer.analyze(image) if image is not None else []
    return embedder.embed(image, found[0][1]) if found else None


def media_files(folder):
    return sorted(p for p in Path(folder).iterdir()
                  if p.is_file() and p.suffix.lower() in utils.IMAGE_EXTS | video.VIDEO_EXTS)


def gallery_embedding(files, analyzer, embedder, samples=GALLERY_SAMPLES):
    """Mean embedding of the largest face in each photo and in `samples` frames spread over each clip."""
    found = []
    for path in files:
        if path.suffix.lower() in utils.IMAGE_EXTS:
            images = [utils.read_image(path)]
        else:
            frames = list(video.read_video(path))
            images = [frames[i] for i in np.linspace(0, len(frames) - 1, min(samples, len(frames))).astype(int)]
        found += [e for e in (largest_face_embedding(im, analyzer, embedder) for im in images) if e is not None]
    return (np.mean(found, 0), len(found)) if found else (None, 0)


def load_gallery(folder, analyzer, embedder):
    """{person: mean embedding} of a gallery folder, cached in folder/.embeddings.json by the files' names, sizes
    and contents (not their times: a copied or re-linked gallery keeps its cache).

    The cache is written after each person that had to be computed (about a minute each), so an interrupted run,
    or another one started meanwhile, does not compute them again."""
    folder = Path(folder)
    if not folder.is_dir():
        raise utils.UserError(f"gallery folder not found: {folder}")
    cache_path = folder / ".embeddings.json"

    def read_cache():
        return utils.read_json(cache_path) if cache_path.is_file() else {}

    cache, gallery = read_cache(), {}
    for person in tqdm(sorted(p for p in folder.iterdir() if p.is_dir()), desc="gallery", unit="person",
                       leave=False):
        files = media_files(person)
        key = [[p.name, p.stat().st_size, utils.content_digest(p)] for p in files]
        if cache.get(person.name, {}).get("files") != key:
            cache = read_cache()  # another run may have computed this person since
        entry = cache.get(person.name)
        if entry is None or entry.get("files") != key:
            embedding, count = gallery_embedding(files, analyzer, embedder)
            entry = dict(files=key, faces=count, embedding=None if embedding is None else embedding.tolist())
            cache = read_cache()  # and kept others meanwhile
            cache[person.name] = entry
            try:
                utils.write_json(cache_path, cache)
            except OSError:
                pass  # a read-only gallery works, it is just not cached
        if entry["embedding"] is None:
            tqdm.write(f"warning: no face found for gallery person {person.name}; left out")
            continue
        gallery[person.name] = np.array(entry["embedding"])
    if not gallery:
        raise utils.UserError(f"no people in the gallery {folder} (expected <person>/ subfolders of photos or clips)")
    return gallery


def sample_frames(path, every, max_frames):
    """(index, image, evaluate this one?) for the frames of a video or image folder."""
    for i, frame in enumerate(video.FrameSource(path)):
        if max_frames and i >= max_frames:
            break
        yield i, frame.image, i % every == 0


def face_crop(image, landmarks, size=160, pad=0.25):
    """The face region of a frame, square, resized to size x size (for the contact sheet); black past the frame's
    edges (a replicated border drew streaks that looked like the swap's)."""
    centre = (np.min(landmarks, 0) + np.max(landmarks, 0)) / 2
    half = (np.max(landmarks, 0) - np.min(landmarks, 0)).max() * (0.5 + pad)
    mat = np.array([[size / (2 * half), 0, size / 2 - centre[0] * size / (2 * half)],
                    [0, size / (2 * half), size / 2 - centre[1] * size / (2 * half)]])
    return cv2.warpAffine(image, mat, (size, size), flags=cv2.INTER_AREA if 2 * half > size else cv2.INTER_CUBIC,
                          borderMode=cv2.BORDER_CONSTANT)


def contact_sheet(samples, path, height=160):
    """For a few frames: source frame and face (top) over converted frame and face (bottom), as one PNG."""
    cols = []
    for src, dst, landmarks in samples:
        size = (int(src.shape[1] * height / src.shape[0]), height)
        top = np.hstack([cv2.resize(src, size, interpolation=cv2.INTER_AREA), face_crop(src, landmarks, height)])
        bottom = np.hstack([cv2.resize(dst, size, interpolation=cv2.INTER_AREA), face_crop(dst, landmarks, height)])
        cols.append(np.vstack([top, bottom]))
        cols.append(np.zeros((2 * height, 4, 3), np.uint8))
    utils.write_image(path, np.hstack(cols[:-1]))


# ---------------------------------------------------------------- main


def identities(args, analyzer, embedder):
    """(names, embeddings (K, 128), target index, other index): A, B (their faces' stored embeddings), then the
    gallery's other people."""
    names, embeddings = ["A", "B"], [faces.person_embedding(args.faces_a), faces.person_embedding(args.faces_b)]
    if args.gallery:
        for name, embedding in load_gallery(args.gallery, analyzer, embedder).items():
            if name not in (args.name_a, args.name_b):  # the pair's own faces stand for them
                names.append(name)
                embeddings.append(embedding)
    if len(names) == 2:
        print("note: the identity gallery holds only A and B, so top-1 retrieval only says which of the two the "
              "swap is nearer; give --gallery (a folder of other people) for a real test")
    target, other = (1, 0) if args.direction == "a2b" else (0, 1)
    return names, np.stack(embeddings), target, other


def run(args):
    utils.print_settings(args, "evaluate.py")
    for path, what in ((args.converted_path, "converted video"), (args.source_path, "source video")):
        if not path.exists():
            raise utils.UserError(f"{what} not found: {path}")
    # the model first: an unreadable checkpoint fails before any frame is measured
    model = models.load_model(args.model_dir / args.checkpoint)[0] if args.heldout_a or args.heldout_b else None
    out_dir = utils.ensure_writable_dir(args.out_dir)
    analyzer, embedder = faces.DetectorSettings.from_args(args).analyzer(), faces.FaceEmbedder()
    names, gallery, target, other = identities(args, analyzer, embedder)
    rows, flicker, samples, counts = measure_frames(args, analyzer, embedder, gallery, target)
    if not rows:
        raise utils.UserError("no face found in any converted frame; nothing to evaluate")
    result = dict(frames=counts[0], frames_evaluated=len(rows), converted_frames_without_face=counts[1],
                  identity=identity_figures(rows, names, target, other, args.direction), **quality_figures(rows),
                  flicker=flicker)
    heldout_target = args.heldout_b if args.direction == "a2b" else args.heldout_a
    if heldout_target:
        t = names[target]
        heldout = float(np.linalg.norm(faces.face_embeddings(heldout_target) - gallery[target], axis=1).mean())
        result["identity"][f"heldout_{t}_distance_to_{t}"] = round(heldout, 4)
        result["identity"]["transfer_index"] = transfer_index(result["identity"], t, heldout)
    if model is not None:
        result["reconstruction"] = reconstructions(model, args.heldout_a, args.heldout_b)
    if samples:
        contact_sheet(samples, out_dir / "contact_sheet.png")
    utils.write_json(out_dir / "evaluation.json", dict(result, settings=utils.settings_dict(args)))
    print_table(result)
    print(f"wrote {out_dir / 'evaluation.json'} and {out_dir / 'contact_sheet.png'}")
    return result


def measure_frames(args, analyzer, embedder, gallery, target):
    """Measure the converted frames against the source's: (a row per evaluated frame, the flicker figures, a few
    (source, converted, landmarks) samples for the contact sheet, (frames read, converted frames without a face))."""
    rows, changes, samples, prev = [], ([], []), [], None
    n_frames = n_missing = 0
    frames = zip(sample_frames(args.source_path, args.every, args.max_frames),
                 sample_frames(args.converted_path, 1, args.max_frames))
    for (i, src, use), (_, dst, _) in tqdm(frames, desc="evaluating", unit="frame"):
        n_frames += 1
        if src.shape != dst.shape:
            raise utils.UserError(f"frame {i}: converted {dst.shape[1]}x{dst.shape[0]} differs from source "
                                  f"{src.shape[1]}x{src.shape[0]} (side-by-side output cannot be evaluated)")
        found_src = analyzer.analyze(src)
        if not found_src:
            prev = None
            continue
        src_landmarks = found_src[0][1]
        if prev is not None:
            box = face_box(src_landmarks, src.shape)
            changes[0].append(frame_change(prev[0], src, box))
            changes[1].append(frame_change(prev[1], dst, box))
        prev = (src, dst)
        if not use:
            continue
        row = frame_row(args, i, src, dst, src_landmarks, analyzer, embedder, gallery, target)
        if row is None:
            n_missing += 1
            continue
        rows.append(row)
        if len(samples) < 6 and i % max(1, 15 * args.every) == 0:
            samples.append((src, dst, src_landmarks))
    return rows, flicker_figures(*changes), samples, (n_frames, n_missing)


def frame_row(args, i, src, dst, src_landmarks, analyzer, embedder, gallery, target):
    """The measures of one converted frame against its source, or None when no face is found in it."""
    found_dst = analyzer.analyze(dst)
    if not found_dst:
        return None
    dst_landmarks = found_dst[0][1]
    interior = align.face_interior_mask(src_landmarks, src.shape)  # the same region in both frames
    row = dict(
        distances=np.linalg.norm(gallery - embedder.embed(dst, dst_landmarks), axis=1),
        source_distance=float(np.linalg.norm(gallery[target] - embedder.embed(src, src_landmarks))),
        landmark_error=landmark_error(src_landmarks, dst_landmarks),
        mouth=(mouth_opening(src_landmarks), mouth_opening(dst_landmarks)),
        pose_error=pose_error(align.head_pose(src_landmarks, src.shape), align.head_pose(dst_landmarks, dst.shape)),
        sharp_src=align.sharpness(src, src_landmarks, interior),
        sharp_dst=align.sharpness(dst, src_landmarks, interior),
        feature_src=feature_sharpness(src, src_landmarks, interior),
        feature_dst=feature_sharpness(dst, src_landmarks, interior))
    if args.noise_control:
        noisy = noise_to_detail(dst, row["sharp_src"], row["sharp_dst"], interior, np.random.default_rng(i))
        row.update(sharp_noisy=align.sharpness(noisy, src_landmarks, interior),
                   feature_noisy=feature_sharpness(noisy, src_landmarks, interior))
    return row


def flicker_figures(changes_src, changes_dst):
    """Mean frame-to-frame change inside the face box, source and converted, and their ratio."""
    if not changes_src:
        return dict(source_mean_change=None, converted_mean_change=None, ratio=None)
    return dict(source_mean_change=round(float(np.mean(changes_src)), 3),
                converted_mean_change=round(float(np.mean(changes_dst)), 3),
                ratio=round(float(np.mean(changes_dst) / max(1e-9, np.mean(changes_src))), 3))


def transfer_index(identity, target, heldout):
    """How far the swap went from the source person to the target: 0 = still the source's face, 1 = as near the
    target's reference as the target's own held-out faces lie, (d(source, T) - d(swap, T)) / (d(source, T) -
    d(held-out T, T))."""
    start, reached = identity[f"mean_distance_source_to_{target}"], identity[f"mean_distance_to_{target}"]
    return round((start - reached) / max(start - heldout, 1e-6), 4)


def noise_to_detail(image, source_detail, detail, interior, rng):
    """The image with grey Gaussian noise inside `interior` that raises its fine detail (the grey Laplacian's
    variance, `detail`) to the source's: the Laplacian of independent noise of variance s^2 has variance 20 s^2."""
    sigma = np.sqrt(max(source_detail - detail, 0.0) / 20)
    noise = rng.normal(0, sigma, image.shape[:2] + (1,)) * (interior > 0.5)[..., None]
    return np.clip(image + noise + 0.5, 0, 255).astype(np.uint8)


def identity_figures(rows, names, target, other, direction):
    distances = np.stack([r["distances"] for r in rows])  # (frames, identities)
    nearest = distances.argmin(1)
    rank = 1 + (distances < distances[:, [target]]).sum(1)
    wrong = [names[k] for k in nearest if k != target]
    t, o = ("B", "A") if direction == "a2b" else ("A", "B")
    return {"gallery_size": len(names), "top1_retrieval": round(float((nearest == target).mean()), 4),
            "mean_rank_of_target": round(float(rank.mean()), 3),
            f"mean_distance_to_{t}": round(float(distances[:, target].mean()), 4),
            f"mean_distance_to_{o}": round(float(distances[:, other].mean()), 4),
            f"mean_distance_source_to_{t}": round(float(np.mean([r["source_distance"] for r in rows])), 4),
            "most_retrieved_instead": max(set(wrong), key=wrong.count) if wrong else None,
            f"two_person_closer_to_{t}": round(float((distances[:, target] < distances[:, other]).mean()), 4),
            f"share_within_{faces.IDENTITY_THRESHOLD:g}_of_{t}":
                round(float((distances[:, target] < faces.IDENTITY_THRESHOLD).mean()), 4),
            "gallery": names}


def feature_sharpness(image, landmarks, interior):
    """align.sharpness of the face shrunk to FEATURE_SCALE px between the eyes (never enlarged): detail at
    the scale of the eyes, brows, nose and lips, where pixel noise and sharpening average out."""
    scale = min(1.0, FEATURE_SCALE / max(align.inter_ocular(landmarks), 1e-6))
    x, y, w, h = cv2.boundingRect((interior > 0.5).astype(np.uint8))
    pad = int(np.ceil(4 / scale))  # the Laplacian's neighbours around the face, at the small scale
    y0, x0 = max(0, y - pad), max(0, x - pad)
    crop, mask = image[y0:y + h + pad, x0:x + w + pad], interior[y0:y + h + pad, x0:x + w + pad]
    size = (max(1, round(crop.shape[1] * scale)), max(1, round(crop.shape[0] * scale)))
    small = cv2.resize(crop, size, interpolation=cv2.INTER_AREA)
    return align.sharpness(small, None, cv2.resize(mask, size, interpolation=cv2.INTER_AREA))


def measured_pairs(rows, source_key, converted_key):
    """(source, converted) arrays of a per-frame measure, over the frames where both are finite and the source's
    is positive (a ratio of them means something)."""
    src = np.array([r[source_key] for r in rows])
    dst = np.array([r[converted_key] for r in rows])
    ok = np.isfinite(src) & np.isfinite(dst) & (src > 0)
    return src[ok], dst[ok]


def quality_figures(rows):
    poses = np.stack([r["pose_error"] for r in rows])
    src, dst = measured_pairs(rows, "sharp_src", "sharp_dst")
    f_src, f_dst = measured_pairs(rows, "feature_src", "feature_dst")
    figures = dict(
        pose=dict(error_deg=round(float(np.nanmean(poses)), 3), yaw_error_deg=round(float(np.nanmean(poses[:, 0])), 3),
                  pitch_error_deg=round(float(np.nanmean(poses[:, 1])), 3),
                  roll_error_deg=round(float(np.nanmean(poses[:, 2])), 3)),
        sharpness=dict(ratio=round(float(dst.mean() / src.mean()), 4) if src.size else None,
                       median_frame_ratio=round(float(np.median(dst / src)), 4) if src.size else None,
                       source=round(float(src.mean()), 2) if src.size else None,
                       converted=round(float(dst.mean()), 2) if src.size else None,
                       feature_scale_ratio=round(float(f_dst.mean() / f_src.mean()), 4) if f_src.size else None),
        expression=dict(landmark_error_over_inter_ocular=round(float(np.mean([r["landmark_error"] for r in rows])), 4),
                        mouth_correlation=mouth_correlation(rows)))
    if "sharp_noisy" in rows[0]:
        n_src, n_dst = measured_pairs(rows, "sharp_src", "sharp_noisy")
        nf_src, nf_dst = measured_pairs(rows, "feature_src", "feature_noisy")
        figures["sharpness"]["noise_control"] = dict(
            ratio=round(float(n_dst.mean() / n_src.mean()), 4) if n_src.size else None,
            feature_scale_ratio=round(float(nf_dst.mean() / nf_src.mean()), 4) if nf_src.size else None)
    return figures


def print_table(result):
    print(f"\n{'metric':<44} value")
    print("-" * 56)
    for group in ("identity", "pose", "sharpness", "expression", "flicker", "reconstruction"):
        for key, value in result.get(group, {}).items():
            if key == "gallery":
                continue
            if isinstance(value, dict):
                value = ", ".join(f"{k} {v}" for k, v in value.items())
            print(f"{group + '.' + key:<44} {value}")
    print(f"{'frames evaluated':<44} {result['frames_evaluated']} of {result['frames']}")


def main(argv=None):
    return utils.main(parse_args, lambda args: run(args) and 0, argv)


if __name__ == "__main__":
    raise SystemExit(main())
