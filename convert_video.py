"""Step 4: swap the faces of a video (A's video gets B's face) with a trained model.

Reads VIDEO_PATH (a video file, or a folder of images), finds and aligns the faces in
every frame with crop_face.py's code (utils.py: the detector every few frames, faces
followed in between), runs the aligned faces through the shared encoder and decoder B in
batches, and pastes the result back with the inverse of the same affine, through a
feathered mask of the landmark hull (brows raised over the forehead) after colour
matching. Landmarks are smoothed over time against jitter, for each person separately;
frames without a face pass through unchanged.

Whose face is swapped: the largest face, except in frames with several faces, where
it is the person the model was trained on (the checkpoint records A's and B's
identity); --reference photos choose the person in every frame instead. Everyone else
passes through untouched.

Writes OUTPUT_PATH as H.264 MP4 at the input's size, frame count and timing (each
frame keeps its timestamp, so a variable frame rate stays in sync with the audio), upright
as the input plays, with the source's audio copied and the file marked as synthetic in its
metadata; or, for a folder input, a folder of PNGs with the same names (never the input
folder). Nothing is written unless the whole conversion succeeds.

Example:
    python convert_video.py --video-path data/personA.mp4 --model-dir models --output-path output/swapped.mp4
Tiny run (first 30 frames):
    python convert_video.py --video-path clip.mp4 --model-dir /tmp/tiny --output-path /tmp/out.mp4 --max-frames 30
"""
import argparse
import contextlib
import fractions
import os
import queue
import threading
import time
from collections import deque
from pathlib import Path

import cv2
import numpy as np
import torch
from tqdm import tqdm

import models
import utils

VIDEO_PATH = Path("data/personA.mp4")        # video (or image folder) of person A
MODEL_DIR = Path("models")                   # train.py's output folder
OUTPUT_PATH = Path("output/swapped.mp4")     # the swapped video (or a folder, for a folder input)
DIRECTION = "a2b"                            # a2b: A's video gets B's face; b2a: the other way
COLOR = "rct"                                # rct (Reinhard LAB), avg, hist or none
MASK_ERODE = 0.0                             # mask erosion, as a fraction of the face width
MASK_BLUR = 0.05                             # mask feathering, as a fraction of the face width
MASK = "both"                                # hull (landmarks), learned (the model's own) or both (intersected)
SMOOTH = 0.5                                 # share of the previous frame's landmarks kept (0 = off)
SHARPEN = "auto"                             # unsharp amount on the swapped face: 0 = off, auto = the video's detail
AUTO_SHARPEN_MAX = 2.0                       # the most --sharpen auto applies
DETAIL = 1.0                                 # share of the replaced face's own skin texture kept (0 = off)
DETAIL_CLIP = 2.0                            # ... up to this many of its typical amplitudes: texture, not edges
BATCH_SIZE = 16                              # faces per model call
WORKERS = 1                                  # detection processes (measured fastest on 2 cores, see README)
IDENTITY_THRESHOLD = 0.6                     # face-recognition distance under which a face is the person
SYNTHETIC_NOTE = "SYNTHETIC MEDIA: face swapped with a deepfake model (faceswap pipeline); not a real recording."
TIME_BASE = fractions.Fraction(1, 90000)     # output timestamps: fine enough for any frame rate


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--video-path", type=Path, default=VIDEO_PATH, help="input video, or a folder of images")
    p.add_argument("--model-dir", type=Path, default=MODEL_DIR, help="folder with train.py's checkpoint")
    p.add_argument("--output-path", type=Path, default=OUTPUT_PATH, help="output .mp4 (or folder)")
    p.add_argument("--checkpoint", default=models.CHECKPOINT,
                   help=f"checkpoint file in --model-dir ({models.BEST_CHECKPOINT} for the best-loss one)")
    p.add_argument("--direction", choices=["a2b", "b2a"], default=DIRECTION,
                   help="a2b: faces go through decoder B (A's video gets B's face); b2a: the reverse")
    p.add_argument("--reference", type=Path, nargs="+", default=None,
                   help="photos of the person whose face to swap (default: in frames with several faces, "
                        "the person the model was trained on)")
    p.add_argument("--identity-threshold", type=float, default=IDENTITY_THRESHOLD,
                   help="largest face-recognition distance to the reference that counts as the person")
    p.add_argument("--color", choices=["rct", "avg", "hist", "none"], default=COLOR, help="colour correction")
    p.add_argument("--mask", choices=["hull", "learned", "both"], default=MASK,
                   help="the face region pasted: the landmark hull, the mask the model learned (models with a "
                        "mask output, e.g. lite128; others use the hull), or where both agree")
    p.add_argument("--mask-erode", type=float, default=MASK_ERODE, help="mask erosion (fraction of face width)")
    p.add_argument("--mask-blur", type=float, default=MASK_BLUR, help="mask feathering (fraction of face width)")
    p.add_argument("--brow-lift", type=float, default=1.0, help="how far the mask reaches above the brows")
    p.add_argument("--seamless", action="store_true", help="Poisson (seamless clone) blending; may flicker")
    p.add_argument("--sharpen", type=sharpen_amount, default=SHARPEN,
                   help="unsharp mask on the swapped face, at the scale the model's face is enlarged by: an amount "
                        "(e.g. 0.5; 0 = off), or auto: as much as brings the face's fine detail up to that of the "
                        f"face it replaces in this video (at most {AUTO_SHARPEN_MAX:g})")
    p.add_argument("--detail", type=utils.non_negative_number, default=DETAIL,
                   help="keep this share of the replaced face's own texture (skin and grain finer than the model "
                        "draws, limited in amplitude so that its edges do not carry over) on the swapped face "
                        "(0 = off)")
    p.add_argument("--smooth", type=float, default=SMOOTH, help="temporal landmark smoothing 0..0.95 (0 = off)")
    p.add_argument("--start-frame", type=utils.non_negative_int, default=0, help="first frame to convert")
    p.add_argument("--max-frames", type=utils.non_negative_int, default=0, help="convert at most N frames (0 = all)")
    p.add_argument("--side-by-side", action="store_true", help="write original | swapped next to each other")
    p.add_argument("--label", action="store_true", help="draw a visible 'SYNTHETIC' label on every frame")
    p.add_argument("--crf", type=int, default=18, help="H.264 quality (0 = lossless, 18 = visually lossless)")
    p.add_argument("--batch-size", type=utils.positive_int, default=BATCH_SIZE, help="faces per model call")
    utils.add_detector_args(p)
    p.add_argument("--redetect-every", type=utils.positive_int, default=utils.REDETECT_EVERY,
                   help="run the detector at least every N frames while following faces (1 = every frame)")
    p.add_argument("--workers", type=utils.positive_int, default=WORKERS,
                   help="detection processes; 1 finds faces in this process, which is fastest while faces are "
                        "followed between detections (the model needs the cores more)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="model precision; auto: bf16 on a GPU or a CPU with AMX, else fp32 (faster there)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    return p.parse_args(argv)


def sharpen_amount(text):
    """--sharpen: 'auto' or an amount >= 0."""
    return text if text == "auto" else utils.non_negative_number(text, "'auto' or ")


# ---------------------------------------------------------------- the swap


def paste_face(frame, face, matrix, landmarks, args, face_mask=None):
    """Frame with `face` (the model's output, aligned by `matrix`) blended in; only the face region changes.
    face_mask: the model's own mask of the face (float, face-sized), used as args.mask says."""
    h, w = frame.shape[:2]
    size = face.shape[0]
    inverse = cv2.invertAffineTransform(matrix)
    corners = utils.transform_points([[0, 0], [size, 0], [0, size], [size, size]], inverse)
    face_width = size / utils.matrix_scale(matrix)
    margin = int(face_width * args.mask_blur) + 2
    x0, y0 = np.maximum(np.floor(corners.min(0)).astype(int) - margin, 0)
    x1, y1 = np.minimum(np.ceil(corners.max(0)).astype(int) + margin, [w, h])
    if x1 <= x0 or y1 <= y0:
        return frame
    roi = frame[y0:y1, x0:x1]
    shift = matrix.copy()
    shift[:, 2] += matrix[:, :2] @ [x0, y0]  # roi pixels -> aligned face
    flags = cv2.INTER_CUBIC | cv2.WARP_INVERSE_MAP
    swapped = cv2.warpAffine(face, shift, (x1 - x0, y1 - y0), flags=flags, borderMode=cv2.BORDER_REPLICATE)
    # The model's square shrunk by the feather width, so the feathered edge fades out inside it:
    # where the hull runs past the square (over the brows) there is no hard seam.
    blur_px = face_width * args.mask_blur
    inner = int(np.ceil(size * args.mask_blur)) + 1
    square = np.zeros((size, size), np.float32)
    square[inner:size - inner, inner:size - inner] = 1
    inside = cv2.warpAffine(square, shift, (x1 - x0, y1 - y0), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                            borderValue=0) > 0.5
    mask = utils.face_hull_mask(landmarks - [x0, y0], roi.shape, args.brow_lift) * inside
    if face_mask is not None and args.mask != "hull":
        learned = cv2.warpAffine(face_mask, shift, (x1 - x0, y1 - y0), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                                 borderValue=0) > 0.5
        mask = (learned * inside).astype(np.float32) if args.mask == "learned" else mask * learned
    mask = erode_and_blur(mask, face_width * args.mask_erode, blur_px)
    swapped = color_transfer(swapped, roi, mask, args.color)
    if args.detail > 0:
        swapped = keep_texture(swapped, roi, mask, face_width / size, args.detail)
    if args.sharpen != 0:
        swapped = sharpen(swapped, roi, mask, face_width / size, args.sharpen)
    out = frame.copy()
    if args.seamless and (mask > 0.5).any():
        binary = (mask > 0.5).astype(np.uint8) * 255
        ys, xs = np.nonzero(binary)
        center = (int((xs.min() + xs.max()) / 2) + x0, int((ys.min() + ys.max()) / 2) + y0)
        full = np.zeros((h, w), np.uint8)
        full[y0:y1, x0:x1] = binary
        canvas = frame.copy()
        canvas[y0:y1, x0:x1] = swapped
        return cv2.seamlessClone(canvas, frame, full, center, cv2.NORMAL_CLONE)
    m = mask[..., None]
    out[y0:y1, x0:x1] = (swapped * m + roi * (1 - m) + 0.5).astype(np.uint8)
    return out


def swap_faces(model, frames, faces, side, settings, device=None, dtype=None):
    """The frames with every listed face replaced by the model's output for `side` ("a" or "b").

    frames: BGR uint8 frames; faces: for each frame a list of 68-point landmark arrays (frame
    pixels) of the faces to swap (an empty list passes the frame through); settings: the
    blending options (color, mask, mask_erode, mask_blur, brow_lift, seamless, batch_size).
    Faces go through the model in batches; each is pasted back through the inverse of the
    affine that aligned it. Returns new frames; the inputs are not modified.
    """
    size = model.input_size
    device = device or torch.device("cpu")
    jobs = [(i, utils.align_matrix(landmarks, size, coverage=1.0), landmarks)
            for i, frame_faces in enumerate(faces) for landmarks in frame_faces]
    crops = [utils.warp_face(frames[i], matrix, size) for i, matrix, _ in jobs]
    outputs, masks = [], []
    with torch.no_grad(), utils.autocast(device, dtype):
        for k in range(0, len(crops), settings.batch_size):
            x = utils.to_tensor(np.stack(crops[k:k + settings.batch_size])).to(device)
            y = model(x.contiguous(memory_format=torch.channels_last), side)
            outputs.extend(utils.to_images(y[:, :3]))
            masks.extend(y[:, 3].float().cpu().numpy() if model.has_mask else [None] * len(x))
    result = list(frames)
    for (i, matrix, landmarks), face, mask in zip(jobs, outputs, masks):
        result[i] = paste_face(result[i], face, matrix, landmarks, settings, mask)
    return result


def sharpen(face, source, mask, upscale, amount):
    """Unsharp mask of the pasted face, at the scale the model's face was enlarged by (`upscale` frame pixels
    per model pixel). amount "auto": as much as brings the face's fine detail (variance of the grey
    Laplacian where mask > 0.5) up to that of `source`, the face it replaces, at most AUTO_SHARPEN_MAX;
    never more than the source has, so a soft or grainy video gets a face of its own kind."""
    face = face.astype(np.float32, copy=False)  # float already after --detail
    detail = fine_band(face, upscale)
    if amount == "auto":
        inside = mask > 0.5
        if inside.sum() < 16:
            return face
        l_face, l_detail, l_source = (
            cv2.Laplacian(cv2.cvtColor(image.astype(np.float32), cv2.COLOR_BGR2GRAY), cv2.CV_32F)[inside]
            .astype(np.float64) for image in (face, detail, source))  # linear: face + a detail -> l_face + a l_detail
        target = l_source.var() - 20 / 12  # less the Laplacian of 8-bit rounding, which the pasted face gets again
        # var(l_face + a l_detail) = target, a quadratic in a; its larger root (the smaller is negative)
        a2 = l_detail.var()
        a1 = 2 * np.mean((l_face - l_face.mean()) * (l_detail - l_detail.mean()))
        a0 = l_face.var() - target
        if a0 >= 0 or a2 <= 0:
            return face
        amount = min(AUTO_SHARPEN_MAX, (-a1 + np.sqrt(a1 * a1 - 4 * a2 * a0)) / (2 * a2))
    return np.clip(face + amount * detail, 0, 255)


def keep_texture(face, source, mask, upscale, amount):
    """`face` with `amount` of `source`'s (the face it replaces) texture added: the band finer than the model's
    pixels (`upscale` frame pixels each), which the model cannot draw, softly limited (tanh) to DETAIL_CLIP times
    that band's typical amplitude inside the mask (> 0.5). Skin texture and the video's grain carry over; the
    strong edges of the replaced face's eyes, brows and mouth, which would show its features through, do not."""
    band = fine_band(source.astype(np.float32), upscale)
    few = (mask > 0.5)[::2, ::2]  # the amplitude from every second pixel, as colour_transfer's statistics
    if few.sum() < 16:
        return face
    limit = DETAIL_CLIP * 1.4826 * np.median(np.abs(band[::2, ::2][few])) + 1e-3  # a robust standard deviation
    band *= 1 / limit  # in place from here: face + amount * limit * tanh(band / limit), clipped to 0..255
    np.tanh(band, out=band)
    band *= amount * limit
    band += face
    return np.clip(band, 0, 255, out=band)


def fine_band(image, upscale):
    """What a float image holds finer than a model pixel enlarged `upscale` times: it less its Gaussian blur."""
    return image - cv2.GaussianBlur(image, (0, 0), max(0.8, upscale / 2))


def erode_and_blur(mask, erode_px, blur_px):
    """A 0/1 mask shrunk by erode_px (a disc; through the distance transform, fast for any size) and feathered."""
    if erode_px > 0:
        inside = (mask > 0.5).astype(np.uint8)
        mask = (cv2.distanceTransform(inside, cv2.DIST_L2, 5) > erode_px).astype(np.float32)
    if blur_px > 0:
        k = 2 * int(blur_px) + 1
        mask = cv2.GaussianBlur(mask, (k, k), 0)
    return mask


def color_transfer(source, target, mask, method="rct"):
    """Recolour `source` (BGR uint8) to match `target` inside mask (> 0.5).

    rct: Reinhard mean/std transfer in LAB; avg: mean colour shift; hist: per-channel
    histogram matching; none: unchanged.
    """
    if method == "none":
        return source
    sel = mask > 0.5
    if sel.sum() < 16:
        return source
    if method == "rct":
        s, t = cv2.cvtColor(source, cv2.COLOR_BGR2LAB), cv2.cvtColor(target, cv2.COLOR_BGR2LAB)
        few = sel[::2, ::2]  # statistics from every second pixel: the same to a fraction of a level, 4x faster
        s_sel, t_sel = s[::2, ::2][few].astype(np.float32), t[::2, ::2][few].astype(np.float32)
        gain = t_sel.std(0) / (s_sel.std(0) + 1e-6)
        levels = np.arange(256, dtype=np.float32)[:, None]
        lut = np.clip((levels - s_sel.mean(0)) * gain + t_sel.mean(0) + 0.5, 0, 255).astype(np.uint8)  # (256, 3)
        out = cv2.merge([cv2.LUT(channel, lut[:, c].copy()) for c, channel in enumerate(cv2.split(s))])
        return cv2.cvtColor(out, cv2.COLOR_LAB2BGR)
    if method == "avg":
        diff = target[sel].astype(np.float32).mean(0) - source[sel].astype(np.float32).mean(0)
        return np.clip(source.astype(np.float32) + diff, 0, 255).astype(np.uint8)
    if method == "hist":
        out = source.copy()
        for c in range(3):
            s_vals, t_vals = source[..., c][sel], target[..., c][sel]
            s_cdf = np.cumsum(np.bincount(s_vals, minlength=256)) / s_vals.size
            t_cdf = np.cumsum(np.bincount(t_vals, minlength=256)) / t_vals.size
            lut = np.searchsorted(t_cdf, s_cdf).clip(0, 255).astype(np.uint8)
            out[..., c] = lut[source[..., c]]
        return out
    raise ValueError(f"unknown colour method {method!r}")


def draw_label(frame, text="SYNTHETIC"):
    h = frame.shape[0]
    scale = max(0.4, h / 720)
    (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, max(1, int(2 * scale)))
    cv2.rectangle(frame, (4, h - th - base - 12), (tw + 14, h - 4), (0, 0, 0), -1)
    cv2.putText(frame, text, (9, h - base - 8), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255),
                max(1, int(2 * scale)), cv2.LINE_AA)
    return frame


class Smoother:
    """Exponential smoothing of each person's landmarks against jitter, following each face separately."""

    def __init__(self, weight):
        self.weight, self.previous = weight, []

    def __call__(self, faces):
        """Smoothed landmarks of this frame's faces; a face is matched to the nearest face of the last frame."""
        smoothed, free = [], list(self.previous)
        for landmarks in faces:
            near = min(free, key=lambda p: np.linalg.norm(p.mean(0) - landmarks.mean(0)), default=None)
            if near is not None:
                free = [p for p in free if p is not near]
            smoothed.append(smooth_landmarks(near, landmarks, self.weight))
        self.previous = smoothed
        return smoothed


def smooth_landmarks(previous, current, weight):
    """Exponential smoothing against jitter; restarts after a jump (cut, fast motion) or a lost face."""
    if previous is None or weight <= 0:
        return current
    left, right = utils.eye_centres(current)
    eye_dist = np.linalg.norm(left - right)
    if np.linalg.norm(current - previous, axis=1).mean() > 0.25 * eye_dist:
        return current
    return weight * previous + (1 - weight) * current


def choose_faces(found, reference, threshold, everywhere):
    """Which of a frame's faces [(landmarks, embedding or None)] (largest first) to swap.

    Without a reference: the largest. With one: the faces within `threshold` of it, nearest
    first (only the nearest, unless `everywhere`, where it decides in every frame)."""
    if not found:
        return []
    if reference is None or (not everywhere and len(found) == 1):
        return [found[0][0]]
    near = sorted((float(np.linalg.norm(embedding - reference).min()), k) for k, (_, embedding) in enumerate(found)
                  if embedding is not None)
    chosen = [found[k][0] for d, k in near if d < threshold]
    return chosen if everywhere else chosen[:1]


# ---------------------------------------------------------------- finding faces (worker processes)


def track_chunk(task):
    """[(landmarks, embedding or None)] for each of a run of consecutive frames, faces followed between frames.

    Embeddings are made where the person must be told apart (`embed`: "all" frames, frames with
    "several" faces, or None), once per face per detection and carried along while it is followed."""
    images, redetect_every, embed = task
    tracker = utils.FaceTracker(utils.worker_analyzer(), redetect_every, all_faces=True)
    results, embeddings = [], []
    for image in images:
        faces = [landmarks for _, landmarks in tracker(image)]
        if not embed or (embed == "several" and len(faces) < 2):
            embeddings = [None] * len(faces)
        elif tracker.detected or len(embeddings) != len(faces) or None in embeddings:
            embeddings = [utils.worker_embedder().embed(image, landmarks) for landmarks in faces]
        results.append(list(zip(faces, embeddings)))
    return results


def found_faces(frames, pool, workers, redetect_every, embed):
    """(frame, [(landmarks, embedding)]) in order; each worker follows faces through a run of frames
    (one detection, then tracking), ahead of the model."""
    pending = deque()
    for chunk in chunked(frames, redetect_every):
        task = ([f.image for f in chunk], redetect_every, embed)
        pending.append((chunk, pool.apply_async(track_chunk, (task,)) if pool else track_chunk(task)))
        while len(pending) > (workers if pool else 0):  # every worker busy with a chunk
            chunk, job = pending.popleft()
            yield from zip(chunk, job.get() if pool else job)
    while pending:
        chunk, job = pending.popleft()
        yield from zip(chunk, job.get() if pool else job)


def chunked(iterable, n):
    chunk = []
    for item in iterable:
        chunk.append(item)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# ---------------------------------------------------------------- input and output


def selected_frames(source, args):
    """The frames of --start-frame/--max-frames, in order."""
    for frame in source:
        if frame.index < args.start_frame:
            continue
        if args.max_frames and frame.index >= args.start_frame + args.max_frames:
            break
        yield frame


def threaded(iterable, depth=32):
    """Run an iterator in a background thread (decoding overlaps the rest)."""
    q, end = queue.Queue(depth), object()
    error = []

    def pump():
        try:
            for item in iterable:
                q.put(item)
        except BaseException as e:  # handed to the consumer
            error.append(e)
        q.put(end)

    threading.Thread(target=pump, daemon=True).start()
    while (item := q.get()) is not end:
        yield item
    if error:
        raise error[0]


class FolderWriter:
    """Writes PNGs named as the input images into a folder (the image-folder mode).

    They go to a hidden folder beside it first; close() moves them in (replacing files of the
    same names), abort() removes them, so a failed run leaves the output as it was."""

    def __init__(self, folder):
        import shutil

        self.folder = Path(folder)
        self.tmp = self.folder.parent / f".{self.folder.name}{utils.TEMP_SUFFIX}"
        shutil.rmtree(self.tmp, ignore_errors=True)  # left by an interrupted run (the output is locked)
        self.tmp.mkdir()

    def write(self, image, frame):
        utils.write_image(self.tmp / (Path(frame.name).stem + ".png"), image)

    def close(self):
        self.folder.mkdir(exist_ok=True)
        for path in self.tmp.iterdir():
            os.replace(path, self.folder / path.name)
        self.tmp.rmdir()

    def abort(self):
        import shutil

        shutil.rmtree(self.tmp, ignore_errors=True)


def bgr_to_frame(image):
    """BGR uint8 -> PyAV yuv444p frame (see utils.frame_to_bgr); the encoder subsamples it exactly."""
    import av

    return av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="bgr24").reformat(format="yuv444p")


class VideoWriter:
    """H.264 MP4 through PyAV, optionally copying the audio of `audio_from`, labelled synthetic.

    Each frame keeps its source timestamp (so a variable frame rate stays variable and the
    copied audio in sync); rebase=True starts the video at 0 (for a part of the source).
    Writes to a temp file beside `path`; close() renames it into place, abort() removes it.
    """

    def __init__(self, path, fps, width, height, audio_from=None, crf=18, rebase=False,
                 metadata_note=SYNTHETIC_NOTE):
        self.path = Path(path)
        fd, self.tmp = utils.temp_path(self.path, suffix=utils.TEMP_SUFFIX + ".mp4")
        os.close(fd)
        self.container, self.audio_in = None, None
        self.fps, self.rebase, self.offset, self.last_pts, self.count = fps or 25.0, rebase, None, -1, 0
        try:
            self._open(width, height, audio_from, crf, metadata_note)
        except BaseException:
            self.abort()  # no temp file left behind
            raise

    def _open(self, width, height, audio_from, crf, metadata_note):
        import av

        self.container = av.open(str(self.tmp), "w", format="mp4")
        self.stream = self.container.add_stream("libx264", rate=fractions.Fraction(self.fps).limit_denominator(1001))
        self.stream.codec_context.time_base = self.stream.time_base = TIME_BASE
        self.stream.width, self.stream.height = width, height
        # 4:2:0 needs even sizes; keep odd-sized inputs at their size with 4:4:4
        self.stream.pix_fmt = "yuv420p" if width % 2 == 0 and height % 2 == 0 else "yuv444p"
        self.stream.options = {"crf": str(crf), "preset": "veryfast"}
        self.container.metadata["comment"] = metadata_note
        self.container.metadata["description"] = metadata_note
        if audio_from is not None:
            source = av.open(str(audio_from))
            if source.streams.audio:
                self.audio_in = source
                self.audio_out = self.container.add_stream_from_template(source.streams.audio[0])
            else:
                source.close()

    def write(self, image, source_frame=None):
        seconds = getattr(source_frame, "time", None)
        seconds = self.count / self.fps if seconds is None else seconds
        if self.offset is None:
            self.offset = seconds if self.rebase else 0.0
        pts = max(round((seconds - self.offset) / TIME_BASE), self.last_pts + 1)  # strictly increasing
        frame = bgr_to_frame(image)
        frame.pts, frame.time_base = pts, TIME_BASE
        self.last_pts, self.count = pts, self.count + 1
        for packet in self.stream.encode(frame):
            self.container.mux(packet)

    def close(self):
        for packet in self.stream.encode():
            self.container.mux(packet)
        if self.audio_in is not None:
            in_stream = self.audio_in.streams.audio[0]
            for packet in self.audio_in.demux(in_stream):
                if packet.dts is None:
                    continue
                packet.stream = self.audio_out
                self.container.mux(packet)
            self.audio_in.close()
        self.container.close()
        os.replace(self.tmp, self.path)

    def abort(self):
        if self.container is not None:
            with contextlib.suppress(Exception):
                self.container.close()
        if self.audio_in is not None:
            self.audio_in.close()
        with contextlib.suppress(OSError):
            self.tmp.unlink()


class BackgroundWriter:
    """Encodes frames in a thread so encoding overlaps detection and the model."""

    def __init__(self, sink, depth=32):
        self.sink, self.q, self.error = sink, queue.Queue(depth), None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while (item := self.q.get()) is not None:
            if self.error is None:
                try:
                    self.sink.write(*item)
                except BaseException as e:
                    self.error = e

    def write(self, image, frame):
        if self.error:
            raise self.error
        self.q.put((image, frame))

    def _stop(self):
        if self.thread.is_alive():
            self.q.put(None)
            self.thread.join()

    def close(self):
        self._stop()
        if self.error:
            raise self.error
        self.sink.close()

    def abort(self):
        """Stop and leave nothing behind (the sink removes its temp files)."""
        self._stop()
        self.sink.abort()


# ---------------------------------------------------------------- the pipeline


def check_paths(args):
    """Refuse, before any work, an output that would destroy the input or clash with what is there."""
    src, out = args.video_path, args.output_path
    if not src.exists():
        raise utils.UserError(f"video not found: {src}")
    utils.ensure_writable_dir(out.parent)
    if src.is_dir():
        inside = out.resolve() == src.resolve() or src.resolve() in out.resolve().parents \
            or out.resolve() in src.resolve().parents
        if inside:
            raise utils.UserError(f"--output-path {out} is, holds or lies inside the input folder {src}; "
                                  "choose a folder outside it (the input is never overwritten)")
        if out.exists() and not out.is_dir():
            raise utils.UserError(f"--output-path {out} is a file; a folder input needs an output folder")
        stems = {}
        for image in utils.list_images(src):
            stems.setdefault(image.stem, []).append(image.name)
        clashes = [names for names in stems.values() if len(names) > 1]
        if clashes:
            raise utils.UserError(f"{src} holds images that would give the same output name: "
                                  f"{', '.join(clashes[0])}{' and more' if len(clashes) > 1 else ''}")
        if out.is_dir() and utils.list_images(out) and not args.overwrite:
            raise utils.UserError(f"{out} already holds images; pass --overwrite or choose another --output-path")
        return
    if out.suffix.lower() != ".mp4":
        raise utils.UserError(f"--output-path must end in .mp4 (got {out.name})")
    if out.is_dir():
        raise utils.UserError(f"--output-path {out} is a folder; give a file name ending in .mp4")
    if out.exists() and not args.overwrite:
        raise utils.UserError(f"{out} exists; pass --overwrite or choose another --output-path")
    if out.resolve() == src.resolve():
        raise utils.UserError("--output-path is the input video; choose another path")


def run(args):
    utils.print_settings(args, "convert_video.py")
    if not 0 <= args.smooth < 1:
        raise utils.UserError("--smooth must be in [0, 1)")
    check_paths(args)
    folder_mode = args.video_path.is_dir()
    with utils.locked(args.output_path.parent, target=args.output_path.name):
        return convert(args, folder_mode)


def convert(args, folder_mode):
    device = utils.pick_device(args.device)
    ckpt = models.load_checkpoint(args.model_dir / args.checkpoint)
    model = models.model_from_checkpoint(ckpt).eval().to(device).to(memory_format=torch.channels_last)
    step = ckpt["step"]
    dtype = utils.pick_precision(args.precision, device)
    side = "b" if args.direction == "a2b" else "a"
    source = utils.FrameSource(args.video_path)
    settings = utils.detector_settings(args)
    reference, everywhere = person_to_swap(args, ckpt, side)
    print(f"model {model.config['name']} at step {step}, decoder {side.upper()}, {source.width}x{source.height} "
          f"{'images' if folder_mode else f'{source.fps:.3f} fps'} -> {args.output_path}")
    if folder_mode:
        sink = FolderWriter(args.output_path)
    else:
        out_w = source.width * 2 if args.side_by_side else source.width
        full_range = args.start_frame == 0 and not args.max_frames
        # audio only fits a full-length conversion
        sink = VideoWriter(args.output_path, source.fps, out_w, source.height, crf=args.crf, rebase=not full_range,
                           audio_from=args.video_path if full_range else None)
    writer = BackgroundWriter(sink)
    workers = utils.detection_workers(args.workers)
    pool = utils.detection_pool(workers, settings)
    embed = None if reference is None else "all" if everywhere else "several"
    n_frames = n_swapped = 0
    smoother = Smoother(args.smooth)
    start = time.time()
    bar = tqdm(unit="frame", desc="converting")
    try:
        frames = found_faces(threaded(selected_frames(source, args)), pool, workers, args.redetect_every, embed)
        for chunk in chunked(frames, args.batch_size):
            faces = [smoother(choose_faces(found, reference, args.identity_threshold, everywhere))
                     for _, found in chunk]
            results = swap_faces(model, [frame.image for frame, _ in chunk], faces, side, args, device, dtype)
            for (frame, _), result, swapped in zip(chunk, results, faces):
                if args.label:
                    result = draw_label(result.copy())
                writer.write(np.hstack([frame.image, result]) if args.side_by_side and not folder_mode else result,
                             frame)
                n_frames += 1
                n_swapped += bool(swapped)
                bar.update(1)
        bar.close()
        if n_frames == 0:
            raise utils.UserError("no frames to convert (check --start-frame/--max-frames)")
        if n_swapped == 0:
            raise utils.UserError(f"no face found in any frame of {args.video_path}; nothing to swap "
                                  "(try --detector cnn or --upsample 1)")
        writer.close()
    except BaseException:
        bar.close()
        writer.abort()
        raise
    finally:
        if pool:
            pool.terminate()
    seconds = time.time() - start
    problem = None if args.max_frames else source.shortfall_message()
    if problem:
        print(f"warning: {problem}; converted the {n_frames} frames that could be read")
    if not folder_mode:  # settings and counts beside the video, for provenance
        utils.write_json(args.output_path.with_suffix(".json"), dict(
            utils.settings_dict(args), synthetic=SYNTHETIC_NOTE, model_step=step, frames=n_frames,
            frames_swapped=n_swapped, seconds=round(seconds, 2), source_complete=problem is None))
    print(f"{n_frames} frames ({n_swapped} with a swapped face, {n_frames - n_swapped} passed through) "
          f"in {seconds:.1f} s = {n_frames / seconds:.1f} frames/s -> {args.output_path}")
    return 0


def person_to_swap(args, ckpt, side):
    """(reference embeddings or None, whether the reference decides in every frame)."""
    if args.reference:
        return utils.reference_embeddings(args.reference, "reference", utils.detector_settings(args)), True
    trained = (ckpt.get("identities") or {}).get("a" if side == "b" else "b")  # the person whose video this is
    return (np.array(trained)[None], False) if trained is not None else (None, False)


def main(argv=None):
    args = parse_args(argv)
    with utils.user_errors():
        return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
