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

import train
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
    p.add_argument("--checkpoint", default=train.CHECKPOINT,
                   help=f"checkpoint file in --model-dir ({train.BEST_CHECKPOINT} for the best-loss one)")
    p.add_argument("--direction", choices=["a2b", "b2a"], default=DIRECTION,
                   help="a2b: faces go through decoder B (A's video gets B's face); b2a: the reverse")
    p.add_argument("--color", choices=["rct", "avg", "hist", "none"], default=COLOR, help="colour correction")
    p.add_argument("--mask-erode", type=float, default=MASK_ERODE, help="mask erosion (fraction of face width)")
    p.add_argument("--mask-blur", type=float, default=MASK_BLUR, help="mask feathering (fraction of face width)")
    p.add_argument("--brow-lift", type=float, default=1.0, help="how far the mask reaches above the brows")
    p.add_argument("--seamless", action="store_true", help="Poisson (seamless clone) blending; may flicker")
    p.add_argument("--smooth", type=float, default=SMOOTH, help="temporal landmark smoothing 0..0.95 (0 = off)")
    p.add_argument("--start-frame", type=int, default=0, help="first frame to convert")
    p.add_argument("--max-frames", type=int, default=0, help="convert at most N frames (0 = all)")
    p.add_argument("--side-by-side", action="store_true", help="write original | swapped next to each other")
    p.add_argument("--label", action="store_true", help="draw a visible 'SYNTHETIC' label on every frame")
    p.add_argument("--crf", type=int, default=18, help="H.264 quality (0 = lossless, 18 = visually lossless)")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="faces per model call")
    p.add_argument("--detector", choices=["hog", "cnn"], default="hog", help="dlib face detector")
    p.add_argument("--detect-size", type=int, default=640, help="longest side of the detection copy")
    p.add_argument("--upsample", type=int, default=0, help="dlib upsampling for small faces")
    p.add_argument("--landmarks-model", type=Path, default=None, help="dlib 68-point model file")
    p.add_argument("--workers", type=int, default=max(1, os.cpu_count() or 1), help="detection processes")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto", help="model precision")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    return p.parse_args(argv)


# ---------------------------------------------------------------- per-frame pieces


def smooth_landmarks(previous, current, weight):
    """Exponential smoothing against jitter; restarts after a jump (cut, fast motion) or a lost face."""
    if previous is None or weight <= 0:
        return current
    eye_dist = np.linalg.norm(current[36:42].mean(0) - current[42:48].mean(0))
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
    inside = utils.erode_and_blur((inside > 0.999).astype(np.float32), blur_px, 0)
    mask = utils.face_hull_mask(landmarks - [x0, y0], roi.shape, args.brow_lift) * inside
    mask = utils.erode_and_blur(mask, face_width * args.mask_erode, blur_px)
    swapped = utils.color_transfer(swapped, roi, mask, args.color)
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


def draw_label(frame, text="SYNTHETIC"):
    h = frame.shape[0]
    scale = max(0.4, h / 720)
    (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, max(1, int(2 * scale)))
    cv2.rectangle(frame, (4, h - th - base - 12), (tw + 14, h - 4), (0, 0, 0), -1)
    cv2.putText(frame, text, (9, h - base - 8), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255),
                max(1, int(2 * scale)), cv2.LINE_AA)
    return frame


def analyze_frame(frame):
    """Largest face's landmarks in a frame, or None (runs in a worker process)."""
    found = utils.worker_analyzer().analyze(frame)
    return found[0][1] if found else None


# ---------------------------------------------------------------- input and output


def open_source(args):
    """(frame iterator, fps, width, height, names or None) for a video file or an image folder."""
    path = args.video_path
    if path.is_dir():
        images = utils.list_images(path)
        if not images:
            raise utils.UserError(f"no images in {path}")
        first = utils.read_image(images[0])
        if first is None:
            raise utils.UserError(f"cannot read {images[0]}")
        images = images[args.start_frame:]
        if args.max_frames:
            images = images[:args.max_frames]

        def frames():
            for p in images:
                image = utils.read_image(p)
                if image is None:
                    raise utils.UserError(f"cannot read {p}")
                yield image
        return frames(), 0.0, first.shape[1], first.shape[0], [p.stem + ".png" for p in images]
    container, stream = utils.open_video(path)
    fps = float(stream.average_rate or stream.guessed_rate or 25)
    width, height = stream.codec_context.width, stream.codec_context.height
    container.close()

    def frames():
        for i, frame in enumerate(utils.read_video(path)):
            if i < args.start_frame:
                continue
            if args.max_frames and i >= args.start_frame + args.max_frames:
                break
            yield frame
    return frames(), fps, width, height, None


class FolderWriter:
    """Writes PNGs with the input's names into a folder (the image-folder mode)."""

    def __init__(self, folder, names):
        self.folder, self.names, self.count = utils.ensure_writable_dir(folder), names, 0

    def write(self, image):
        utils.write_image(self.folder / self.names[self.count], image)
        self.count += 1

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


class BackgroundWriter:
    """Encodes frames in a thread so encoding overlaps detection and the model."""

    def __init__(self, writer, depth=32):
        self.writer, self.q, self.error = writer, queue.Queue(depth), None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while (image := self.q.get()) is not None:
            if self.error is None:
                try:
                    self.writer.write(image)
                except BaseException as e:
                    self.error = e

    def write(self, image):
        if self.error:
            raise self.error
        self.q.put(image)

    def stop(self):
        self.q.put(None)
        self.thread.join()

    def close(self):
        self.stop()
        if self.error:
            raise self.error
        self.writer.close()


# ---------------------------------------------------------------- main loop


def load_model(args, device):
    ckpt = train.load_checkpoint(args.model_dir / args.checkpoint)
    model = train.model_from_checkpoint(ckpt).to(device).eval()
    return model, ckpt["step"]


def run(args):
    utils.print_settings(args, "convert_video.py")
    if not 0 <= args.smooth < 1:
        raise utils.UserError("--smooth must be in [0, 1)")
    if not args.video_path.exists():
        raise utils.UserError(f"video not found: {args.video_path}")
    folder_mode = args.video_path.is_dir()
    check_output(args, folder_mode)
    device = train.pick_device(args.device)
    model, step = load_model(args, device)
    dtype = train.pick_precision(args.precision, device)
    side = "b" if args.direction == "a2b" else "a"
    size = model.input_size
    frames, fps, width, height, names = open_source(args)
    init = (args.detector, args.landmarks_model, args.detect_size, args.upsample)
    utils.init_worker_analyzer(*init)  # fail early on a bad landmarks model
    print(f"model {model.config['name']} at step {step}, decoder {side.upper()}, {width}x{height} "
          f"{'images' if folder_mode else f'{fps:.3f} fps'} -> {args.output_path}")

    if folder_mode:
        sink = FolderWriter(args.output_path, names)
    else:
        out_w = width * 2 if args.side_by_side else width
        full_range = args.start_frame == 0 and not args.max_frames
        # audio only fits a full-length conversion
        sink = utils.VideoWriter(args.output_path, fps, out_w, height, crf=args.crf,
                                 audio_from=args.video_path if full_range else None)
    writer = BackgroundWriter(sink)
    pool = mp.get_context("spawn").Pool(args.workers, utils.init_worker_analyzer, init) if args.workers > 1 else None
    stats = dict(frames=0, swapped=0)
    previous = None
    start = time.time()
    bar = tqdm(unit="frame", desc="converting")

    def finish_chunk(chunk, found):
        """Smooth landmarks, run the model on the chunk's faces, blend and write the frames."""
        nonlocal previous
        jobs = []
        for frame, landmarks in zip(chunk, found):
            if landmarks is None:
                previous = None
                jobs.append(None)
                continue
            previous = smooth_landmarks(previous, landmarks, args.smooth)
            matrix = utils.align_matrix(previous, size, coverage=1.0)
            jobs.append((matrix, previous, utils.warp_face(frame, matrix, size)))
        faces = [j[2] for j in jobs if j is not None]
        outputs = []
        with torch.no_grad(), train.autocast(device, dtype):
            for i in range(0, len(faces), args.batch_size):
                x = utils.to_tensor(np.stack(faces[i:i + args.batch_size])).to(device)
                outputs.extend(utils.to_images(model(x.contiguous(memory_format=torch.channels_last), side)))
        outputs = iter(outputs)
        for frame, job in zip(chunk, jobs):
            result = frame
            if job is not None:
                result = paste_face(frame, next(outputs), job[0], job[1], args)
                stats["swapped"] += 1
            if args.label:
                result = draw_label(result.copy())
            writer.write(np.hstack([frame, result]) if args.side_by_side and not folder_mode else result)
            stats["frames"] += 1
            bar.update(1)

    try:
        pending = deque()
        for chunk in chunked(threaded(frames), max(args.batch_size, 8)):
            found = pool.map_async(analyze_frame, chunk) if pool else [analyze_frame(f) for f in chunk]
            pending.append((chunk, found))
            if len(pending) > 1:  # detection of this chunk overlaps the model and blending of the last
                c, f = pending.popleft()
                finish_chunk(c, f.get() if pool else f)
        while pending:
            c, f = pending.popleft()
            finish_chunk(c, f.get() if pool else f)
        bar.close()
        if stats["frames"] == 0:
            raise utils.UserError("no frames to convert (check --start-frame/--max-frames)")
        if stats["swapped"] == 0:
            raise utils.UserError(f"no face found in any frame of {args.video_path}; nothing to swap "
                                  "(try --detector cnn or --upsample 1)")
        writer.close()
    except BaseException:
        bar.close()
        if writer.thread.is_alive():
            writer.stop()
        sink.abort()
        raise
    finally:
        if pool:
            pool.terminate()
    seconds = time.time() - start
    if not folder_mode:  # settings and counts beside the video, for provenance
        utils.write_json(args.output_path.with_suffix(".json"), dict(
            utils.settings_dict(args), synthetic=utils.SYNTHETIC_NOTE, model_step=step,
            frames=stats["frames"], frames_swapped=stats["swapped"], seconds=round(seconds, 2)))
    print(f"{stats['frames']} frames ({stats['swapped']} with a swapped face, "
          f"{stats['frames'] - stats['swapped']} passed through) in {seconds:.1f} s "
          f"= {stats['frames'] / seconds:.1f} frames/s -> {args.output_path}")
    return 0


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
