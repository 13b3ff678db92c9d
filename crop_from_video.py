"""Step 1: extract frames from a video.

Reads a video (mp4, mov, avi, mkv, gif, ... through PyAV, the reader every step uses, so
these frames are pixel for pixel what convert_video.py sees) and writes its frames, upright
(phones' rotation applied), as zero-padded, correctly sorting images (000000.png,
000001.png, ... named by source frame index) into SAVE_DIR, plus SAVE_DIR/frames.json:
where they came from (path, size and a digest of the video, fps, size, rotation), the
settings, each frame's index and timestamp, and whether the extraction is complete.

frames.json is written every few seconds while frames are written, so an interrupted run
(Ctrl-C, a crash, kill -9) continues where it stopped when run again. A folder holding
frames of another video or of other settings is never mixed into: the script stops,
unless --overwrite replaces the old frames. A damaged or cut video gives a warning naming
the frame where decoding stopped, and frames.json records complete: false.

Example (every 2nd frame of the first 10 seconds):
    python crop_from_video.py --video-path ../shared/data/videos/styletalk_obama_clip1.mp4 \\
        --save-dir train/personA --every 2 --end 10
Tiny run:
    python crop_from_video.py --video-path clip.mp4 --save-dir /tmp/frames --max-frames 20
"""
import argparse
import time
from pathlib import Path

from tqdm import tqdm

import records
import utils
import video

VIDEO_PATH = Path("data/personA.mp4")  # the video to read
SAVE_DIR = Path("train/personA")      # where the frames go
EVERY = 1                             # keep every Nth frame
MAX_FRAMES = 0                        # stop after this many frames written (0 = no limit)
IMAGE_FORMAT = "png"                  # png (lossless) or jpg (smaller)
SAVE_SECONDS = 5                      # frames.json is rewritten this often while extracting


def frame_name(index, ext="png"):
    """Zero-padded so names sort in frame order."""
    return f"{index:06d}.{ext}"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--video-path", type=Path, default=VIDEO_PATH, help="input video")
    p.add_argument("--save-dir", type=Path, default=SAVE_DIR, help="output folder for the frames")
    p.add_argument("--every", type=utils.positive_int, default=EVERY, help="keep every Nth frame")
    p.add_argument("--max-frames", type=utils.non_negative_int, default=MAX_FRAMES,
                   help="stop after N frames written (0 = all)")
    p.add_argument("--start", type=utils.non_negative_number, default=0.0, help="start time in seconds")
    p.add_argument("--end", type=utils.non_negative_number, default=0.0, help="end time in seconds (0 = end of video)")
    p.add_argument("--format", choices=["png", "jpg"], default=IMAGE_FORMAT, help="image format")
    p.add_argument("--overwrite", action="store_true",
                   help="replace frames already in --save-dir (otherwise the script refuses)")
    return p.parse_args(argv)


def source_record(args, source):
    """What identifies this extraction: the video file (its size and contents; its path for the reader) and the
    settings."""
    return dict(source=str(args.video_path.resolve()), source_bytes=args.video_path.stat().st_size,
                source_digest=utils.content_digest(args.video_path), every=args.every, start=args.start, end=args.end,
                max_frames=args.max_frames, format=args.format)


def previous_frames(save_dir, record, overwrite):
    """{index: time} of frames an earlier run of this same extraction wrote (to resume), {} to start afresh,
    or None when that run is complete. Frames of another video or other settings are refused, or with
    --overwrite deleted: only the frames the earlier record lists (images of your own stay)."""
    existing = utils.list_images(save_dir)
    try:
        meta = records.read_frames(save_dir)
    except utils.UserError:
        if not overwrite:
            raise
        meta = None  # a damaged record: --overwrite starts afresh (what it listed is unknown, so nothing goes)
    if meta is not None and not overwrite and all(meta.get(k) == record[k] for k in records.FRAMES_SOURCE_KEYS):
        names = {p.name for p in existing}
        done = {i: t for i, t in zip(meta["frames"], meta["times"]) if frame_name(i, record["format"]) in names}
        if meta.get("complete") and len(done) == len(meta["frames"]):
            return None
        return done
    if existing and not overwrite:
        raise utils.UserError(f"{save_dir} already holds {len(existing)} images from another video or other "
                              "settings; choose another --save-dir or pass --overwrite to replace them")
    listed = set() if meta is None else {frame_name(i, meta.get("format", "png")) for i in meta["frames"]}
    for p in existing:
        if p.name in listed and not p.is_symlink():
            p.unlink()
    return {}


def run(args):
    utils.print_settings(args, "crop_from_video.py")
    source = video.FrameSource(args.video_path)
    if source.is_folder:
        raise utils.UserError(f"{args.video_path} is a folder; --video-path takes a video file")
    save_dir = utils.ensure_writable_dir(args.save_dir)
    with utils.locked(save_dir):
        return extract(args, source, save_dir)


def extract(args, source, save_dir):
    record = source_record(args, source)
    done = previous_frames(save_dir, record, args.overwrite)
    if done is None:
        print(f"{save_dir} already holds these frames; nothing to do (--overwrite to extract again)")
        return 0
    if done:
        print(f"resuming: {len(done)} frames already written")
    info = dict(fps=source.fps, width=source.width, height=source.height, rotation=source.rotation,
                announced_frames=source.expected)
    written = dict(done)
    reached_end = write_frames(args, source, save_dir, written, lambda: records.write_frames(
        save_dir, record, info, written, complete=False))
    if not written:
        records.write_frames(save_dir, record, info, written, complete=False)
        raise utils.UserError("no frames in the requested range (check --start/--end)")
    problem = None if reached_end else source.shortfall_message()
    records.write_frames(save_dir, record, info, written, complete=problem is None, note=problem)
    if problem:
        print(f"warning: {problem}; frames.json records complete: false")
    print(f"wrote {len(written)} frames ({source.width}x{source.height}, {source.fps:.3f} fps) to {save_dir}")
    return 0


def write_frames(args, source, save_dir, written, save):
    """Write the selected frames not in `written` ({index: seconds}, updated), calling save() every SAVE_SECONDS;
    whether the selection ended (--end, --max-frames) before the video did."""
    first_wanted = first_time = None
    last_save = time.time()
    with tqdm(total=source.expected, unit="frame", desc="reading") as bar:
        for frame in source:
            bar.update(1)
            if frame.time is None:
                t = frame.index / (source.fps or 25)
            else:  # seconds from the first frame
                first_time = frame.time if first_time is None else first_time
                t = frame.time - first_time
            if args.end and t >= args.end - 1e-6:
                return True
            if t < args.start - 1e-6:
                continue
            first_wanted = frame.index if first_wanted is None else first_wanted
            if (frame.index - first_wanted) % args.every:
                continue
            if frame.index not in written:
                utils.write_image(save_dir / frame_name(frame.index, args.format), frame.image)
                written[frame.index] = round(t, 6)
            if args.max_frames and len(written) >= args.max_frames:
                return True
            if time.time() - last_save > SAVE_SECONDS:  # an interrupted run resumes from here
                save()
                last_save = time.time()
    return False


def main(argv=None):
    return utils.main(parse_args, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
