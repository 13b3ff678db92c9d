"""Step 1: extract frames from a video.

Reads any video OpenCV can open (mp4, avi, mov, gif, ...) and writes its frames
as zero-padded, correctly sorting images (000000.png, 000001.png, ... named by
source frame index) into SAVE_DIR, plus SAVE_DIR/frames.json recording where
they came from (source path, fps, size, frame indices).

A folder holding frames of another video (or of other settings) is never mixed
into: the script stops, unless --overwrite replaces the old frames.

Example (every 2nd frame of the first 10 seconds):
    python crop_from_video.py --video-path ../shared/data/videos/styletalk_obama_clip1.mp4 \
        --save-dir train/personA --every 2 --end 10
Tiny run:
    python crop_from_video.py --video-path clip.mp4 --save-dir /tmp/frames --max-frames 20
"""
import argparse
from pathlib import Path

import cv2
from tqdm import tqdm

import utils

VIDEO_PATH = Path("data/personA.mp4")  # the video to read
SAVE_DIR = Path("train/personA")      # where the frames go
EVERY = 1                             # keep every Nth frame
MAX_FRAMES = 0                        # stop after this many frames written (0 = no limit)
IMAGE_FORMAT = "png"                  # png (lossless) or jpg (smaller)
META_NAME = "frames.json"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--video-path", type=Path, default=VIDEO_PATH, help="input video")
    p.add_argument("--save-dir", type=Path, default=SAVE_DIR, help="output folder for the frames")
    p.add_argument("--every", type=utils.positive_int, default=EVERY, help="keep every Nth frame")
    p.add_argument("--max-frames", type=utils.non_negative_int, default=MAX_FRAMES,
                   help="stop after N frames written (0 = all)")
    p.add_argument("--start", type=float, default=0.0, help="start time in seconds")
    p.add_argument("--end", type=float, default=0.0, help="end time in seconds (0 = end of video)")
    p.add_argument("--format", choices=["png", "jpg"], default=IMAGE_FORMAT, help="image format")
    p.add_argument("--overwrite", action="store_true",
                   help="replace frames already in --save-dir (otherwise the script refuses)")
    return p.parse_args(argv)


def open_capture(path):
    """(capture, fps, width, height, frame_count) or a UserError saying what is wrong."""
    path = utils.require_file(path, "video")
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise utils.UserError(f"cannot open {path} as a video (unsupported or corrupt file)")
    fps = cap.get(cv2.CAP_PROP_FPS) or 0.0
    width, height = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
    count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    return cap, fps, width, height, count


def wanted_frames(index, fps, args):
    """Whether frame `index` is inside the time range and on the --every grid; None past the end."""
    t = index / fps if fps > 0 else 0.0
    if args.end and t >= args.end:
        return None
    start_index = round(args.start * fps) if fps > 0 else 0
    return index >= start_index and (index - start_index) % args.every == 0


def source_record(args, fps, width, height):
    stat = args.video_path.stat()
    return dict(source=str(args.video_path.resolve()), source_bytes=stat.st_size, fps=fps, width=width,
                height=height, every=args.every, start=args.start, end=args.end,
                max_frames=args.max_frames, format=args.format)


def check_save_dir(save_dir, record, overwrite):
    """Refuse to mix frames of different videos/settings; returns True when already done."""
    existing = utils.list_images(save_dir)
    meta_path = save_dir / META_NAME
    if not existing:
        return False
    if meta_path.exists() and not overwrite:
        meta = utils.read_json(meta_path)
        same = all(meta.get(k) == v for k, v in record.items())
        if same and meta.get("complete") and len(meta.get("frames", [])) == len(existing):
            return True
    if not overwrite:
        raise utils.UserError(f"{save_dir} already holds {len(existing)} images from another video or other "
                              "settings; choose another --save-dir or pass --overwrite to replace them")
    for p in existing:
        p.unlink()
    return False


def run(args):
    utils.print_settings(args, "crop_from_video.py")
    cap, fps, width, height, count = open_capture(args.video_path)
    ok, first = cap.read()
    if not ok or first is None:
        raise utils.UserError(f"{args.video_path} has no readable frames")
    cap.release()
    save_dir = utils.ensure_writable_dir(args.save_dir)
    record = source_record(args, fps, width, height)
    if check_save_dir(save_dir, record, args.overwrite):
        print(f"{save_dir} already holds these frames; nothing to do (--overwrite to extract again)")
        return 0
    cap = cv2.VideoCapture(str(args.video_path))
    written, index = [], 0
    total = count if count > 0 else None
    with tqdm(total=total, unit="frame", desc="reading") as bar:
        while True:
            want = wanted_frames(index, fps, args)
            if want is None:
                break
            if want:
                ok, frame = cap.read()
            else:
                ok, frame = cap.grab(), None  # skip without decoding to an image
            if not ok:
                break
            if want:
                name = utils.frame_name(index, args.format)
                utils.write_image(save_dir / name, frame)
                written.append(index)
                if args.max_frames and len(written) >= args.max_frames:
                    bar.update(1)
                    break
            index += 1
            bar.update(1)
    cap.release()
    if not written:
        raise utils.UserError("no frames in the requested range (check --start/--end)")
    utils.write_json(save_dir / META_NAME, dict(record, frames=written, complete=True))
    print(f"wrote {len(written)} frames ({width}x{height}, {fps:.3f} fps) to {save_dir}")
    return 0


def main(argv=None):
    args = parse_args(argv)
    with utils.user_errors():
        return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
