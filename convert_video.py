"""Step 4: swap the faces of a video (A's video gets B's face) with a trained model.

Reads VIDEO_PATH (a video file, or a folder of images), finds and aligns the faces in
every frame with crop_face.py's code (faces.py: the detector every few frames, faces
followed in between), runs the aligned faces through the shared encoder and decoder B in
batches, and pastes the result back with the inverse of the same affine, through a
feathered mask of the landmark hull (brows raised over the forehead), less what the
decoder was never trained to draw (the checkpoint records where), after colour
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
import functools
import json
import queue
import threading
import time
from collections import deque
from pathlib import Path

import cv2
import numpy as np
import torch
from tqdm import tqdm

import align
import blend
import faces
import models
import tensors
import utils
import video

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
DETAIL = 1.0                                 # share of the replaced face's own skin texture kept (0 = off)
BATCH_SIZE = 16                              # faces per model call
WORKERS = 1                                  # detection processes (1 is fastest on 2 cores, docs/SPEED.md)


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
    p.add_argument("--identity-threshold", type=utils.non_negative_number, default=faces.IDENTITY_THRESHOLD,
                   help="largest face-recognition distance to the reference that counts as the person")
    p.add_argument("--color", choices=["rct", "avg", "hist", "none"], default=COLOR, help="colour correction")
    p.add_argument("--mask", choices=["hull", "learned", "both"], default=MASK,
                   help="the face region pasted: the landmark hull, the model's own mask (the one it learned, for "
                        "models with a mask output, e.g. lite128; for others, where the decoder was trained to draw: "
                        "the loss's face region on at least a tenth of the person's training faces), or where both "
                        "agree (the hull, less what the decoder never learned to draw: no dark marks where A's jaw "
                        "reaches past B's)")
    p.add_argument("--mask-erode", type=utils.non_negative_number, default=MASK_ERODE,
                   help="mask erosion (fraction of face width)")
    p.add_argument("--mask-blur", type=utils.non_negative_number, default=MASK_BLUR,
                   help="mask feathering (fraction of face width)")
    p.add_argument("--brow-lift", type=utils.non_negative_number, default=1.0,
                   help="how far the mask reaches above the brows (straight up the face, by this times the "
                        "brows' height over the eyes)")
    p.add_argument("--seamless", action="store_true", help="Poisson (seamless clone) blending; may flicker")
    p.add_argument("--sharpen", type=sharpen_amount, default=SHARPEN,
                   help="unsharp mask on the swapped face, at the scale the model's face is enlarged by: an amount "
                        "(e.g. 0.5; 0 = off), or auto: as much as brings the face's fine detail up to that of the "
                        f"face it replaces in this video (at most {blend.AUTO_SHARPEN_MAX:g})")
    p.add_argument("--detail", type=utils.non_negative_number, default=DETAIL,
                   help="keep this share of the replaced face's own texture (skin and grain finer than the model "
                        "draws, limited in amplitude so that its edges do not carry over) on the swapped face "
                        "(0 = off)")
    p.add_argument("--smooth", type=utils.number(0, below=1), default=SMOOTH,
                   help="temporal landmark smoothing: the share of the last frame's landmarks kept, 0 to under 1 "
                        "(0 = off)")
    p.add_argument("--start-frame", type=utils.non_negative_int, default=0, help="first frame to convert")
    p.add_argument("--max-frames", type=utils.non_negative_int, default=0, help="convert at most N frames (0 = all)")
    p.add_argument("--side-by-side", action="store_true", help="write original | swapped next to each other")
    p.add_argument("--label", action="store_true", help="draw a visible 'SYNTHETIC' label on every frame")
    p.add_argument("--crf", type=utils.whole(0, 51), default=18,
                   help="H.264 quality, 0 to 51 (0 = lossless, 18 = visually lossless)")
    p.add_argument("--batch-size", type=utils.positive_int, default=BATCH_SIZE, help="faces per model call")
    faces.add_detector_args(p)
    p.add_argument("--redetect-every", type=utils.positive_int, default=faces.REDETECT_EVERY,
                   help="run the detector at least every N frames while following faces (1 = every frame)")
    p.add_argument("--workers", type=utils.positive_int, default=WORKERS,
                   help="detection processes; 1 finds faces in this process, which is fastest while faces are "
                        "followed between detections (the model needs the cores more)")
    utils.add_device_args(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    return p.parse_args(argv)


def sharpen_amount(text):
    """--sharpen: 'auto' or an amount >= 0."""
    return text if text == "auto" else utils.number(0, also="'auto' or ")(text)


# ---------------------------------------------------------------- the swap


def swap_faces(model, frames, chosen, side, settings=blend.BlendSettings(), batch_size=BATCH_SIZE, device=None,
               dtype=None):
    """The frames with every chosen face replaced by the model's output for `side` ("a" or "b").

    frames: BGR uint8 frames; chosen: for each frame a list of 68-point landmark arrays (frame
    pixels) of the faces to swap (an empty list passes the frame through); settings: how the faces are
    pasted (blend.BlendSettings). Faces go through the model in batches; each is pasted back through the
    inverse of the affine that aligned it. Returns new frames; the inputs are not modified.
    """
    size, out_size = model.input_size, model.output_size
    device = device or torch.device("cpu")
    jobs = [(i, landmarks) for i, frame_faces in enumerate(chosen) for landmarks in frame_faces]
    crops = [align.warp_face(frames[i], align.align_matrix(landmarks, size, model.coverage), size)
             for i, landmarks in jobs]
    outputs, masks = [], []
    reach = model.reach_mask(side)  # a model without a mask output: where its decoder was taught to draw
    with torch.no_grad(), utils.autocast(device, dtype):
        for k in range(0, len(crops), batch_size):
            x = tensors.to_tensor(np.stack(crops[k:k + batch_size])).to(device)
            y = model.draw(x.contiguous(memory_format=torch.channels_last), side)
            outputs.extend(tensors.to_images(y[:, :3]))
            masks.extend(y[:, 3].float().cpu().numpy() if model.has_mask else [reach] * len(x))
    result = list(frames)
    for (i, landmarks), face, mask in zip(jobs, outputs, masks):  # pasted with the matrix of the face's own size
        result[i] = blend.paste_face(result[i], face, align.align_matrix(landmarks, out_size, model.coverage),
                                     landmarks, settings, mask)
    return result


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
    eye_dist = np.linalg.norm(current[align.LEFT_EYE].mean(0) - current[align.RIGHT_EYE].mean(0))
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
    "several" faces, or None), once per face and carried along while it is followed (faces.carry_embeddings)."""
    images, redetect_every, embed = task
    tracker = faces.FaceTracker(faces.worker_analyzer(), redetect_every, all_faces=True)
    results, carried = [], []
    for image in images:
        found = tracker(image)
        if not embed or (embed == "several" and len(found) < 2):
            carried = []
            results.append([(landmarks, None) for _, landmarks in found])
            continue
        carried = faces.carry_embeddings(image, found, carried if tracker.continued else [], embed_face)
        results.append([(landmarks, embedding) for embedding, _, landmarks in carried])
    return results


def embed_face(image, landmarks):
    return faces.worker_embedder().embed(image, landmarks), None


def found_faces(frames, pool, redetect_every, embed):
    """(frame, [(landmarks, embedding)]) in order; each worker follows faces through a run of frames
    (one detection, then tracking), ahead of the model."""
    pending = deque()
    for chunk in chunked(frames, redetect_every):
        pending.append((chunk, pool.apply_async(track_chunk, (([f.image for f in chunk], redetect_every, embed),))))
        while len(pending) > pool.ahead:  # every worker busy with a chunk
            chunk, job = pending.popleft()
            yield from zip(chunk, job.get())
    while pending:
        chunk, job = pending.popleft()
        yield from zip(chunk, job.get())


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


# ---------------------------------------------------------------- the pipeline


def check_paths(args):
    """Refuse, before any work, an output that would destroy the input or clash with what is there."""
    src, out = args.video_path, args.output_path
    if not src.exists():
        raise utils.UserError(f"video not found: {src}")
    utils.ensure_writable_dir(out.parent)
    if src.is_dir():
        check_folder_output(src, out, args.overwrite)
        return
    if out.suffix.lower() != ".mp4":
        raise utils.UserError(f"--output-path must end in .mp4 (got {out.name})")
    if out.is_dir():
        raise utils.UserError(f"--output-path {out} is a folder; give a file name ending in .mp4")
    if out.exists() and not args.overwrite:
        raise utils.UserError(f"{out} exists; pass --overwrite or choose another --output-path")
    if out.resolve() == src.resolve():
        raise utils.UserError("--output-path is the input video; choose another path")
    sidecar = out.with_suffix(".json")
    if sidecar.exists() and not (args.overwrite and is_our_sidecar(sidecar)):
        raise utils.UserError(f"{sidecar} exists (the settings record written beside the video would replace it); "
                              + ("move it away or choose another --output-path" if not is_our_sidecar(sidecar)
                                 else "pass --overwrite or choose another --output-path"))


def check_folder_output(src, out, overwrite):
    """A folder input writes a folder of PNGs: never into, around or over the input, nor over the user's images."""
    inside = out.resolve() == src.resolve() or src.resolve() in out.resolve().parents \
        or out.resolve() in src.resolve().parents
    if inside:
        raise utils.UserError(f"--output-path {out} is, holds or lies inside the input folder {src}; "
                              "choose a folder outside it (the input is never overwritten)")
    if out.exists() and not out.is_dir():
        raise utils.UserError(f"--output-path {out} is a file; a folder input needs an output folder")
    if not out.exists() and out.suffix.lower() in video.VIDEO_EXTS:
        raise utils.UserError(f"--output-path {out} looks like a video file, but a folder of images is converted "
                              "into a folder of images: give a folder name")
    stems = {}
    for image in utils.list_images(src):
        stems.setdefault(image.stem, []).append(image.name)
    clashes = [names for names in stems.values() if len(names) > 1]
    if clashes:
        raise utils.UserError(f"{src} holds images that would give the same output name: "
                              f"{', '.join(clashes[0])}{' and more' if len(clashes) > 1 else ''}")
    if out.is_dir() and utils.list_images(out) and not overwrite:
        raise utils.UserError(f"{out} already holds images; pass --overwrite or choose another --output-path")


def is_our_sidecar(path):
    """Whether a JSON file is a settings record this script wrote beside a video."""
    try:
        return json.loads(path.read_text()).get("synthetic") == video.SYNTHETIC_NOTE
    except (OSError, ValueError, AttributeError):
        return False


def run(args):
    utils.print_settings(args, "convert_video.py")
    check_paths(args)
    with utils.locked(args.output_path.parent, target=args.output_path.name):
        return convert(args)


def convert(args):
    device = utils.pick_device(args.device)
    ckpt = models.load_checkpoint(args.model_dir / args.checkpoint)
    model = models.model_from_checkpoint(ckpt).eval().to(device).to(memory_format=torch.channels_last)
    side = "b" if args.direction == "a2b" else "a"
    source = video.FrameSource(args.video_path)
    reference, everywhere = person_to_swap(args, ckpt, side)
    print(f"model {model.config['name']} at step {ckpt['step']}, decoder {side.upper()}, {source.width}x"
          f"{source.height} {'images' if source.is_folder else f'{source.fps:.3f} fps'} -> {args.output_path}")
    swap = functools.partial(swap_faces, model, side=side, settings=blend.BlendSettings.from_args(args),
                             batch_size=args.batch_size, device=device, dtype=utils.pick_precision(args.precision,
                                                                                                  device))
    start = time.time()
    writer = video.BackgroundWriter(open_sink(args, source), depth=frames_held(source))
    try:
        with faces.detection_pool(faces.detection_workers(args.workers),
                                  faces.DetectorSettings.from_args(args)) as pool:
            counts = swap_frames(args, source, pool, swap, writer, reference, everywhere)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    report(args, source, ckpt["step"], counts, time.time() - start)
    return 0


def swap_frames(args, source, pool, swap, writer, reference, everywhere):
    """Swap the selected frames of `source` into `writer`: (frames written, frames with a swapped face)."""
    embed = None if reference is None else "all" if everywhere else "several"
    smoother, n_frames, n_swapped = Smoother(args.smooth), 0, 0
    frames = found_faces(threaded(selected_frames(source, args), frames_held(source)), pool, args.redetect_every,
                         embed)
    with tqdm(total=frames_to_convert(source, args), unit="frame", desc="converting") as bar:
        for chunk in chunked(frames, args.batch_size):
            chosen = [smoother(choose_faces(found, reference, args.identity_threshold, everywhere))
                      for _, found in chunk]
            for (frame, _), result, swapped in zip(chunk, swap([f.image for f, _ in chunk], chosen), chosen):
                if args.label:
                    result = draw_label(result.copy())
                writer.write(np.hstack([frame.image, result]) if args.side_by_side and not source.is_folder
                             else result, frame)
                n_frames, n_swapped = n_frames + 1, n_swapped + bool(swapped)
                bar.update(1)
    if n_frames == 0:
        raise utils.UserError("no frames to convert (check --start-frame/--max-frames)")
    if n_swapped == 0:
        raise utils.UserError(f"no face found in any frame of {args.video_path}; nothing to swap "
                              "(try --detector cnn or --upsample 1)")
    return n_frames, n_swapped


def open_sink(args, source):
    """The output: a folder of PNGs for a folder input, else an H.264 MP4 (the source's audio only with every
    frame, which it fits)."""
    if source.is_folder:
        return video.FolderWriter(args.output_path)
    full_range = args.start_frame == 0 and not args.max_frames
    return video.VideoWriter(args.output_path, source.fps, source.width * (2 if args.side_by_side else 1),
                             source.height, crf=args.crf, rebase=not full_range,
                             audio_from=args.video_path if full_range else None)


FRAMES_MEMORY_MB = 256  # what the frames waiting in each queue (decoded, swapped) may hold


def frames_held(source):
    """How many frames each queue between decoding, finding faces, the model and encoding holds: up to 32, fewer
    for large frames, so that memory stays bounded whatever the video's size and length."""
    frame_mb = source.width * source.height * 3 / 2 ** 20
    return int(max(2, min(32, FRAMES_MEMORY_MB // max(frame_mb, 1e-3))))


def frames_to_convert(source, args):
    """The number of frames --start-frame/--max-frames select, where the source announces its length."""
    if not source.expected:
        return None
    left = max(0, source.expected - args.start_frame)
    return min(left, args.max_frames) if args.max_frames else left


def report(args, source, step, counts, seconds):
    n_frames, n_swapped = counts
    problem = None if args.max_frames else source.shortfall_message()
    if problem:
        print(f"warning: {problem}; converted the {n_frames} frames that could be read")
    if not source.is_folder:  # settings and counts beside the video, for provenance
        utils.write_json(args.output_path.with_suffix(".json"), dict(
            utils.settings_dict(args), synthetic=video.SYNTHETIC_NOTE, model_step=step, frames=n_frames,
            frames_swapped=n_swapped, seconds=round(seconds, 2), source_complete=problem is None))
    print(f"{n_frames} frames ({n_swapped} with a swapped face, {n_frames - n_swapped} passed through) "
          f"in {seconds:.1f} s = {n_frames / seconds:.1f} frames/s -> {args.output_path}")


def person_to_swap(args, ckpt, side):
    """(reference embeddings or None, whether the reference decides in every frame)."""
    if args.reference:
        return faces.reference_embeddings(args.reference, "reference", faces.DetectorSettings.from_args(args)), True
    trained = (ckpt.get("identities") or {}).get("a" if side == "b" else "b")  # the person whose video this is
    return (np.array(trained)[None], False) if trained is not None else (None, False)


def main(argv=None):
    return utils.main(parse_args, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
