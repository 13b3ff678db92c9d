"""Step 4: swap the faces of a video (A's video gets B's face) with a trained model.

Reads VIDEO_PATH (a video file, or a folder of images), finds and aligns the
face in every frame with exactly crop_face.py's code (utils.py), runs the
aligned faces through the shared encoder and decoder B in batches, and pastes
the result back with the inverse of the same affine, through a feathered mask
of the landmark hull (brows raised over the forehead) after colour matching.
Landmarks are smoothed over time against jitter; frames without a face pass
through unchanged. Writes OUTPUT_PATH as H.264 MP4 at the input's size, fps and
frame count, with the source's audio copied and the file marked as synthetic in
its metadata (or, for a folder input, a folder of PNGs with the same names).

Example:
    python convert_video.py --video-path data/personA.mp4 --model-dir models --output-path output/swapped.mp4
Tiny run (first 30 frames):
    python convert_video.py --video-path clip.mp4 --model-dir /tmp/tiny --output-path /tmp/out.mp4 --max-frames 30
"""
import argparse
import contextlib
import multiprocessing as mp
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
MASK_ERODE = 0.03                            # mask erosion, as a fraction of the face width
MASK_BLUR = 0.08                             # mask feathering, as a fraction of the face width
SMOOTH = 0.5                                 # share of the previous frame's landmarks kept (0 = off)
BATCH_SIZE = 16                              # faces per model call


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
    p.add_argument("--color", choices=["rct", "avg", "hist", "none"], default=COLOR, help="colour correction")
    p.add_argument("--mask-erode", type=float, default=MASK_ERODE, help="mask erosion (fraction of face width)")
    p.add_argument("--mask-blur", type=float, default=MASK_BLUR, help="mask feathering (fraction of face width)")
    p.add_argument("--brow-lift", type=float, default=1.0, help="how far the mask reaches above the brows")
    p.add_argument("--seamless", action="store_true", help="Poisson (seamless clone) blending; may flicker")
    p.add_argument("--smooth", type=float, default=SMOOTH, help="temporal landmark smoothing 0..0.95 (0 = off)")
    p.add_argument("--start-frame", type=utils.non_negative_int, default=0, help="first frame to convert")
    p.add_argument("--max-frames", type=utils.non_negative_int, default=0, help="convert at most N frames (0 = all)")
    p.add_argument("--side-by-side", action="store_true", help="write original | swapped next to each other")
    p.add_argument("--label", action="store_true", help="draw a visible 'SYNTHETIC' label on every frame")
    p.add_argument("--crf", type=int, default=18, help="H.264 quality (0 = lossless, 18 = visually lossless)")
    p.add_argument("--batch-size", type=utils.positive_int, default=BATCH_SIZE, help="faces per model call")
    utils.add_detector_args(p)
    p.add_argument("--workers", type=utils.positive_int, default=max(1, os.cpu_count() or 1),
                   help="detection processes")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto", help="model precision")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    return p.parse_args(argv)


# ---------------------------------------------------------------- the swap


def smooth_landmarks(previous, current, weight):
    """Exponential smoothing against jitter; restarts after a jump (cut, fast motion) or a lost face."""
    if previous is None or weight <= 0:
        return current
    left, right = utils.eye_centres(current)
    eye_dist = np.linalg.norm(left - right)
    if np.linalg.norm(current - previous, axis=1).mean() > 0.25 * eye_dist:
        return current
    return weight * previous + (1 - weight) * current


def paste_face(frame, face, matrix, landmarks, args):
    """Frame with `face` (the model's output, aligned by `matrix`) blended in; only the face region changes."""
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
    inside = cv2.warpAffine(np.ones((size, size), np.float32), shift, (x1 - x0, y1 - y0),
                            flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderValue=0)
    # Shrink the model's square by the feather width first, so the feathered edge fades out
    # inside it: where the hull runs past the square (over the brows) there is no hard seam.
    blur_px = face_width * args.mask_blur
    inside = erode_and_blur((inside > 0.999).astype(np.float32), blur_px, 0)
    mask = utils.face_hull_mask(landmarks - [x0, y0], roi.shape, args.brow_lift) * inside
    mask = erode_and_blur(mask, face_width * args.mask_erode, blur_px)
    swapped = color_transfer(swapped, roi, mask, args.color)
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
    blending options (color, mask_erode, mask_blur, brow_lift, seamless, batch_size).
    Faces go through the model in batches; each is pasted back through the inverse of the
    affine that aligned it. Returns new frames; the inputs are not modified.
    """
    size = model.input_size
    device = device or torch.device("cpu")
    jobs = [(i, utils.align_matrix(landmarks, size, coverage=1.0), landmarks)
            for i, frame_faces in enumerate(faces) for landmarks in frame_faces]
    crops = [utils.warp_face(frames[i], matrix, size) for i, matrix, _ in jobs]
    outputs = []
    with torch.no_grad(), utils.autocast(device, dtype):
        for k in range(0, len(crops), settings.batch_size):
            x = utils.to_tensor(np.stack(crops[k:k + settings.batch_size])).to(device)
            outputs.extend(utils.to_images(model(x.contiguous(memory_format=torch.channels_last), side)[:, :3]))
    result = list(frames)
    for (i, matrix, landmarks), face in zip(jobs, outputs):
        result[i] = paste_face(result[i], face, matrix, landmarks, settings)
    return result


def erode_and_blur(mask, erode_px, blur_px):
    if erode_px > 0:
        k = 2 * int(erode_px) + 1
        mask = cv2.erode(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)))
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
        s = cv2.cvtColor(source, cv2.COLOR_BGR2LAB).astype(np.float32)
        t = cv2.cvtColor(target, cv2.COLOR_BGR2LAB).astype(np.float32)
        s_mean, s_std = s[sel].mean(0), s[sel].std(0) + 1e-6
        t_mean, t_std = t[sel].mean(0), t[sel].std(0)
        out = (s - s_mean) * (t_std / s_std) + t_mean
        return cv2.cvtColor(np.clip(out, 0, 255).astype(np.uint8), cv2.COLOR_LAB2BGR)
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


def analyze_frame(frame):
    """Largest face's landmarks in a Frame, or None (runs in a worker process)."""
    found = utils.worker_analyzer().analyze(frame.image)
    return found[0][1] if found else None


# ---------------------------------------------------------------- input and output


def selected_frames(source, args):
    """The frames of --start-frame/--max-frames, in order."""
    for frame in source:
        if frame.index < args.start_frame:
            continue
        if args.max_frames and frame.index >= args.start_frame + args.max_frames:
            break
        yield frame


class FolderWriter:
    """Writes PNGs named as the input images into a folder (the image-folder mode)."""

    def __init__(self, folder):
        self.folder = utils.ensure_writable_dir(folder)

    def write(self, image, frame):
        utils.write_image(self.folder / (Path(frame.name).stem + ".png"), image)

    def close(self):
        pass

    def abort(self):
        pass


def check_output(args, folder_mode):
    out = args.output_path
    if folder_mode:
        if out.exists() and (not out.is_dir() or utils.list_images(out)) and not args.overwrite:
            raise utils.UserError(f"{out} already holds images; pass --overwrite or choose another --output-path")
        return
    if out.suffix.lower() != ".mp4":
        raise utils.UserError(f"--output-path must end in .mp4 (got {out.name})")
    if out.exists() and not args.overwrite:
        raise utils.UserError(f"{out} exists; pass --overwrite or choose another --output-path")
    if out.resolve() == args.video_path.resolve():
        raise utils.UserError("--output-path is the input video; choose another path")
    utils.ensure_writable_dir(out.parent)


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


SYNTHETIC_NOTE = "SYNTHETIC MEDIA: face swapped with a deepfake model (faceswap pipeline); not a real recording."

def bgr_to_frame(image):
    """BGR uint8 -> PyAV yuv444p frame (see frame_to_bgr); the encoder subsamples it exactly."""
    import av

    return av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="bgr24").reformat(format="yuv444p")


class VideoWriter:
    """H.264 MP4 through PyAV, optionally copying the audio of `audio_from`, labelled synthetic.

    Writes to a temp file beside `path`; close() renames it into place, abort() removes it.
    """

    def __init__(self, path, fps, width, height, audio_from=None, crf=18, metadata_note=SYNTHETIC_NOTE):
        self.path = Path(path)
        fd, self.tmp = utils.temp_path(self.path, suffix=utils.TEMP_SUFFIX + ".mp4")
        os.close(fd)
        self.container, self.audio_in = None, None
        try:
            self._open(fps, width, height, audio_from, crf, metadata_note)
        except BaseException:
            self.abort()  # no temp file left behind
            raise
        self.count = 0

    def _open(self, fps, width, height, audio_from, crf, metadata_note):
        import fractions

        import av

        self.container = av.open(str(self.tmp), "w", format="mp4")
        rate = fractions.Fraction(fps).limit_denominator(1001) if fps else fractions.Fraction(25)
        self.stream = self.container.add_stream("libx264", rate=rate)
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
        frame = bgr_to_frame(image)
        frame.pts = self.count
        self.count += 1
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
        """Stop and leave nothing behind (the sink removes its temp file)."""
        self._stop()
        self.sink.abort()


# ---------------------------------------------------------------- the pipeline


def run(args):
    utils.print_settings(args, "convert_video.py")
    if not 0 <= args.smooth < 1:
        raise utils.UserError("--smooth must be in [0, 1)")
    if not args.video_path.exists():
        raise utils.UserError(f"video not found: {args.video_path}")
    folder_mode = args.video_path.is_dir()
    check_output(args, folder_mode)
    device = utils.pick_device(args.device)
    model, step = models.load_model(args.model_dir / args.checkpoint)
    model.to(device)
    dtype = utils.pick_precision(args.precision, device)
    side = "b" if args.direction == "a2b" else "a"
    source = utils.FrameSource(args.video_path)
    init = utils.detector_settings(args)
    utils.init_worker_analyzer(*init)  # fail early on a bad landmarks model
    print(f"model {model.config['name']} at step {step}, decoder {side.upper()}, {source.width}x{source.height} "
          f"{'images' if folder_mode else f'{source.fps:.3f} fps'} -> {args.output_path}")

    if folder_mode:
        sink = FolderWriter(args.output_path)
    else:
        out_w = source.width * 2 if args.side_by_side else source.width
        full_range = args.start_frame == 0 and not args.max_frames
        # audio only fits a full-length conversion
        sink = VideoWriter(args.output_path, source.fps, out_w, source.height, crf=args.crf,
                           audio_from=args.video_path if full_range else None)
    writer = BackgroundWriter(sink)
    pool = mp.get_context("spawn").Pool(args.workers, utils.init_worker_analyzer, init) if args.workers > 1 else None
    n_frames = n_swapped = 0
    previous = None  # the last frame's smoothed landmarks
    start = time.time()
    bar = tqdm(unit="frame", desc="converting")
    try:
        frames = threaded(selected_frames(source, args))
        for chunk in chunked(detected(frames, pool, max(args.batch_size, 8)), args.batch_size):
            faces = []
            for _, landmarks in chunk:
                previous = None if landmarks is None else smooth_landmarks(previous, landmarks, args.smooth)
                faces.append([] if previous is None else [previous])
            originals = [frame.image for frame, _ in chunk]
            results = swap_faces(model, originals, faces, side, args, device, dtype)
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
    if not folder_mode:  # settings and counts beside the video, for provenance
        utils.write_json(args.output_path.with_suffix(".json"), dict(
            utils.settings_dict(args), synthetic=SYNTHETIC_NOTE, model_step=step,
            frames=n_frames, frames_swapped=n_swapped, seconds=round(seconds, 2)))
    print(f"{n_frames} frames ({n_swapped} with a swapped face, {n_frames - n_swapped} passed through) "
          f"in {seconds:.1f} s = {n_frames / seconds:.1f} frames/s -> {args.output_path}")
    return 0


def detected(frames, pool, chunk_size):
    """(frame, landmarks of its largest face or None), in order; detection runs one chunk ahead in the pool."""
    pending = deque()
    for chunk in chunked(frames, chunk_size):
        pending.append((chunk, pool.map_async(analyze_frame, chunk) if pool else [analyze_frame(f) for f in chunk]))
        if len(pending) > 1:  # this chunk's detection overlaps the model and blending of the last one
            yield from finished(pending.popleft(), pool)
    while pending:
        yield from finished(pending.popleft(), pool)


def finished(job, pool):
    chunk, found = job
    return zip(chunk, found.get() if pool else found)


def chunked(iterable, n):
    chunk = []
    for item in iterable:
        chunk.append(item)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def main(argv=None):
    args = parse_args(argv)
    with utils.user_errors():
        return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
