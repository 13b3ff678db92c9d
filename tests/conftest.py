import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
EXAMPLES = ROOT / "examples"            # the demo pair, committed: person A and person B of the tests
PHOTOS = ROOT / "tests" / "data"        # committed photos and a several-people clip (tests/data/SOURCES.md)
OBAMA = EXAMPLES / "obama.mp4"
REAGAN = EXAMPLES / "reagan.mp4"
HAMILTON = PHOTOS / "hamilton.mp4"
SHARED = ROOT.parent / "shared" / "data"  # the larger set beside the checkout, when there: extra coverage only


def run_main(main, argv, capsys):
    """Run a script's main(argv) in-process: (exit code, captured stdout/stderr with .out and .err)."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr()


def ctrl_c_at_step(monkeypatch, n):
    """Make train.py's n-th training step of this test raise KeyboardInterrupt (Ctrl-C); the others run."""
    import train
    real_step, calls = train.train_step, []

    def step(*args):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real_step(*args)

    monkeypatch.setattr(train, "train_step", step)
    return real_step


def frames_and_faces(root, video, frames=120):
    """Frames and aligned faces of the first `frames` frames of a real clip, under root."""
    import crop_face
    import crop_from_video

    crop_from_video.main(["--video-path", str(video), "--save-dir", str(root / "frames"), "--max-frames", str(frames)])
    crop_face.main(["--images-dir", str(root / "frames"), "--faces-dir", str(root / "faces"), "--workers", "2"])
    return root


@pytest.fixture(scope="session")
def obama_faces(tmp_path_factory):
    """Person A: the Obama clip's first 120 frames and faces (made once per session)."""
    return frames_and_faces(tmp_path_factory.mktemp("obama"), OBAMA)


@pytest.fixture(scope="session")
def reagan_faces(tmp_path_factory):
    """Person B: the Reagan clip's first 120 frames and faces."""
    return frames_and_faces(tmp_path_factory.mktemp("reagan"), REAGAN)


def make_clip(path, frames, fps=30, audio_seconds=None, rotation=0, times=None, faststart=False):
    """Write BGR frames as an H.264 MP4 (near-lossless), with a 440 Hz AAC tone if audio_seconds is given.

    rotation: a display rotation (degrees counter-clockwise, as phones record; the frames are stored
    as given); times: each frame's timestamp in seconds (a variable frame rate); faststart: the index
    at the front of the file (so a cut file still announces every frame)."""
    import fractions

    import av
    import numpy as np

    import video as video_io

    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", options=options) as out:
        video = out.add_stream("libx264", rate=fractions.Fraction(fps))
        video.height, video.width = frames[0].shape[:2]
        video.pix_fmt, video.options = "yuv444p", {"crf": "0"}
        if times is not None:
            video.codec_context.time_base = video.time_base = fractions.Fraction(1, 90000)
        if rotation:
            video.set_display_rotation(rotation)
        audio = out.add_stream("aac", rate=16000) if audio_seconds else None
        for i, f in enumerate(frames):
            frame = video_io.bgr_to_frame(f)
            if times is None:
                frame.pts = i
            else:
                frame.pts, frame.time_base = round(times[i] * 90000), fractions.Fraction(1, 90000)
            out.mux(video.encode(frame))
        out.mux(video.encode())
        if audio:
            t = np.arange(int(16000 * audio_seconds)) / 16000
            tone = np.repeat((0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None], 2, axis=0)
            chunk = av.AudioFrame.from_ndarray(tone, format="fltp", layout="stereo")
            chunk.sample_rate, chunk.pts = 16000, 0
            out.mux(audio.encode(chunk))
            out.mux(audio.encode())
    return path


@pytest.fixture(scope="session")
def tiny_model(obama_faces, reagan_faces, tmp_path_factory):
    """A tiny model trained briefly on the real faces (behaviour tests, not quality)."""
    import train

    model_dir = tmp_path_factory.mktemp("tiny_model")
    train.main(["--faces-a", str(obama_faces / "faces"), "--faces-b", str(reagan_faces / "faces"),
                "--model-dir", str(model_dir), "--model", "tiny", "--batch-size", "8", "--iterations", "40",
                "--lr", "2e-4", "--workers", "0"])
    return model_dir
