"""Video in and out: every step reads frames through FrameSource (video files through PyAV, or image folders), and
convert_video.py writes through VideoWriter (H.264 MP4 with the source's audio, labelled synthetic) or FolderWriter
(PNGs), each atomic: nothing appears unless the whole output is written.
"""
import collections
import contextlib
import fractions
import os
import queue
import shutil
import threading
from pathlib import Path

import av
import cv2
import numpy as np

import utils
from utils import UserError

SYNTHETIC_NOTE = "SYNTHETIC MEDIA: face swapped with a deepfake model (faceswap pipeline); not a real recording."
TIME_BASE = fractions.Fraction(1, 90000)  # output timestamps: fine enough for any frame rate
VIDEO_EXTS = {".mp4", ".mov", ".avi", ".mkv", ".webm", ".gif", ".m4v"}

# ---------------------------------------------------------------- reading

Frame = collections.namedtuple("Frame", "index name time image")
Frame.__doc__ = """One input frame: its index, its file name (image folders) or None, its presentation time
in seconds (videos, as the file has it; None for folders) and the BGR uint8 image, upright."""

_ROTATE = {90: cv2.ROTATE_90_COUNTERCLOCKWISE, -90: cv2.ROTATE_90_CLOCKWISE, 180: cv2.ROTATE_180,
           -180: cv2.ROTATE_180, 270: cv2.ROTATE_90_CLOCKWISE, -270: cv2.ROTATE_90_COUNTERCLOCKWISE}


class FrameSource:
    """The frames of a video file (PyAV) or of an image folder (sorted by name), read once, in order.

    Every step reads frames through this class, so they all see the same pixels. Videos:
    frames are turned upright by the display rotation phones record (`rotation`, in
    degrees counter-clockwise) and carry their timestamps, so a variable frame rate can
    be kept. Decoding that fails part-way (a damaged or cut file) ends the frames early
    and leaves a message in `error`; `expected` is the frame count the file announces
    (None if it does not). Unreadable images in a folder are a UserError.
    """

    def __init__(self, path):
        self.path = Path(path)
        self.error, self.count = None, 0
        if self.path.is_dir():
            self.names = [p.name for p in utils.list_images(self.path)]
            if not self.names:
                raise UserError(f"no images in {self.path}")
            first = utils.read_image(self.path / self.names[0])
            if first is None:
                raise UserError(f"cannot read {self.path / self.names[0]}")
            self.is_folder, self.fps, self.rotation, self.expected = True, 0.0, 0, len(self.names)
            self.height, self.width = first.shape[:2]
            self.has_audio = False
            return
        utils.require_file(self.path, "video")
        self.is_folder, self.names = False, None
        try:
            with av.open(str(self.path)) as container:
                if not container.streams.video:
                    raise UserError(f"{self.path} has no video stream")
                stream = container.streams.video[0]
                rate = stream.average_rate or stream.guessed_rate
                self.fps = float(rate) if rate else 0.0
                self.has_audio = bool(container.streams.audio)
                first = next(container.decode(stream), None)
                if first is None:
                    raise UserError(f"{self.path} has no readable frames")
                self.rotation = int(round(first.rotation or 0))
                self.expected = stream.frames or None
                if not self.expected and stream.duration and stream.time_base and self.fps:
                    self.expected = round(float(stream.duration * stream.time_base) * self.fps)
        except (av.FFmpegError, OSError, ValueError, StopIteration) as e:
            raise UserError(f"cannot open {self.path} as a video: {e}") from None
        w, h = first.width, first.height
        self.width, self.height = (h, w) if self.rotation % 180 else (w, h)

    def __iter__(self):
        """Frame tuples; for videos, decoding errors end the iteration and are kept in self.error."""
        self.error, self.count = None, 0
        if self.is_folder:
            for i, name in enumerate(self.names):
                image = utils.read_image(self.path / name)
                if image is None:
                    raise UserError(f"cannot read {self.path / name} (not an image, or damaged)")
                self.count += 1
                yield Frame(i, name, None, image)
            return
        with av.open(str(self.path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            frames = container.decode(stream)
            while True:
                try:
                    frame = next(frames)
                except StopIteration:
                    break
                except (av.FFmpegError, OSError) as e:
                    self.error = f"decoding stopped after frame {self.count}: {e}"
                    break
                image = frame_to_bgr(frame)
                if self.rotation in _ROTATE:
                    image = cv2.rotate(image, _ROTATE[self.rotation])
                self.count += 1
                yield Frame(self.count - 1, None, frame.time, image)

    @property
    def complete(self):
        """False when decoding failed part-way or fewer frames came out than the file announces."""
        if self.error:
            return False
        return not self.expected or self.is_folder or self.count >= self.expected

    def shortfall_message(self):
        """A one-line warning about a damaged or cut file, or None."""
        if self.complete:
            return None
        expected = f" of the {self.expected} the file announces" if self.expected else ""
        reason = f" ({self.error})" if self.error else ""
        return f"{self.path} ended early: {self.count} frames decoded{expected}{reason}; the file looks damaged or cut"


def video_info(path):
    """dict(fps, width, height, frames, has_audio, rotation, complete) of a video, frames counted by decoding."""
    source = FrameSource(path)
    frames = sum(1 for _ in source)
    return dict(fps=source.fps, width=source.width, height=source.height, frames=frames,
                has_audio=source.has_audio, rotation=source.rotation, complete=source.complete)


def read_video(path):
    """The BGR frames of a video file (or image folder), upright, in order."""
    return (frame.image for frame in FrameSource(path))


# PyAV keeps one swscale context per thread for the thread's life. With slice threads of its own (swscale's default),
# a process forked while another thread holds one (the encoding thread below, a reader) hangs for good as it frees
# that thread's context (train.py's batch workers, after a video step in the same process: demo.py, the tests).
SWS_THREADS = 1


def frame_to_bgr(frame):
    """PyAV frame -> BGR uint8, through 4:4:4 first.

    swscale's direct 4:2:0 <-> BGR path is off by a few levels (chroma 127 for 128:
    grey 90 comes back as 86, 89, 87); going through yuv444p is exact for grey.
    """
    name = frame.format.name
    if name.startswith("yuvj"):
        frame = frame.reformat(format="yuvj444p", threads=SWS_THREADS)
    elif name.startswith("yuv"):
        frame = frame.reformat(format="yuv444p", threads=SWS_THREADS)
    return frame.to_ndarray(format="bgr24", threads=SWS_THREADS)


# ---------------------------------------------------------------- writing


class FolderWriter:
    """Writes PNGs named as the input images into a folder (the image-folder mode).

    They go to a hidden folder beside it first; close() moves them in (replacing files of the
    same names), abort() removes them, so a failed run leaves the output as it was."""

    def __init__(self, folder):
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
        shutil.rmtree(self.tmp, ignore_errors=True)


def bgr_to_frame(image):
    """BGR uint8 -> PyAV yuv444p frame (see frame_to_bgr); the encoder subsamples it exactly."""
    return av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="bgr24").reformat(format="yuv444p",
                                                                                          threads=SWS_THREADS)


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
