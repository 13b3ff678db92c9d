"""Real-world input loses nothing: rotated and variable-rate videos, damaged files, interrupted and
concurrent runs, folder-mode safety, one-line errors, file permissions."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pytest

from conftest import OBAMA, REAGAN, ROOT, make_clip, run_main

import convert_video
import crop_face
import crop_from_video
import evaluate
import faces
import models
import records
import train
import utils
import video


@pytest.fixture(scope="module")
def obama_frames():
    return [f for _, f in zip(range(40), video.read_video(OBAMA))]


def convert(args, capsys):
    return run_main(convert_video.main, args, capsys)


def test_rotated_phone_video_is_read_upright_and_converted_upright(obama_frames, tiny_model, tmp_path, capsys):
    """Frames stored sideways with a -90 degree display matrix (as phones record): every step sees them upright."""
    upright = obama_frames[:12]
    stored = [np.ascontiguousarray(np.rot90(f, 1)) for f in upright]  # sideways in the file
    clip = make_clip(tmp_path / "phone.mp4", stored, rotation=-90)
    source = video.FrameSource(clip)
    assert (source.rotation, source.width, source.height) == (-90, 256, 256 * 1)
    read = [f.image for f in source]
    assert all(np.abs(a.astype(int) - b).mean() < 2 for a, b in zip(read, upright))
    assert crop_from_video.main(["--video-path", str(clip), "--save-dir", str(tmp_path / "frames")]) == 0
    first = utils.read_image(tmp_path / "frames" / "000000.png")
    assert np.abs(first.astype(int) - upright[0]).mean() < 2
    code, io = convert(["--video-path", str(clip), "--model-dir", str(tiny_model), "--output-path",
                        str(tmp_path / "out.mp4"), "--workers", "1"], capsys)
    assert code == 0, io.err
    assert "12 with a swapped face, 0 passed through" in io.out
    out = list(video.read_video(tmp_path / "out.mp4"))
    assert video.FrameSource(tmp_path / "out.mp4").rotation == 0  # plays upright anywhere
    assert np.abs(out[0][:20].astype(int) - upright[0][:20]).mean() < 3  # the top rows: the original's, upright


def test_variable_frame_rate_keeps_each_frame_in_time_with_the_audio(obama_frames, tiny_model, tmp_path, capsys):
    """45 frames at 60 fps then 45 at 15 fps with audio: a marked frame keeps its time (it drifted 1 s before)."""
    frames = (obama_frames * 3)[:90]
    frames = [f.copy() for f in frames]
    frames[45][:16, :16] = 255  # the marked frame, at 0.75 s
    times = [i / 60 for i in range(45)] + [0.75 + i / 15 for i in range(45)]
    clip = make_clip(tmp_path / "vfr.mp4", frames, fps=30, audio_seconds=3.7, times=times)
    code, io = convert(["--video-path", str(clip), "--model-dir", str(tiny_model), "--output-path",
                        str(tmp_path / "out.mp4"), "--workers", "1"], capsys)
    assert code == 0, io.err
    out = list(video.FrameSource(tmp_path / "out.mp4"))
    assert len(out) == 90
    marked = next(f for f in out if f.image[:16, :16].mean() > 200 and f.index > 0)
    source_times = [f.time for f in video.FrameSource(clip)]
    assert marked.index == 45
    assert abs(marked.time - source_times[45]) < 1 / 60  # under one frame duration
    assert abs(out[-1].time - source_times[-1]) < 1 / 60
    with av.open(str(tmp_path / "out.mp4")) as c, av.open(str(clip)) as s:
        assert [p.pts for p in c.demux(c.streams.audio[0]) if p.size] == \
               [p.pts for p in s.demux(s.streams.audio[0]) if p.size]  # the audio as it was


def test_cut_file_warns_and_is_recorded_incomplete(obama_frames, tiny_model, tmp_path, capsys):
    clip = make_clip(tmp_path / "full.mp4", obama_frames, faststart=True)
    data = clip.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[:int(len(data) * 0.3)])
    code, io = run_main(crop_from_video.main, ["--video-path", str(cut), "--save-dir", str(tmp_path / "frames")],
                        capsys)
    assert code == 0
    meta = json.loads((tmp_path / "frames" / "frames.json").read_text())
    written = len(utils.list_images(tmp_path / "frames"))
    assert meta["complete"] is False and 0 < written < 40 and meta["announced_frames"] == 40
    assert f"ended early: {written} frames decoded of the 40 the file announces" in io.out
    code, io = convert(["--video-path", str(cut), "--model-dir", str(tiny_model), "--output-path",
                        str(tmp_path / "out.mp4"), "--workers", "1"], capsys)
    assert code == 0 and "ended early" in io.out
    assert video.video_info(tmp_path / "out.mp4")["frames"] == written
    # crop_face says the frames folder is incomplete
    code, io = run_main(crop_face.main, ["--images-dir", str(tmp_path / "frames"), "--faces-dir",
                                         str(tmp_path / "faces"), "--workers", "1"], capsys)
    assert code == 0 and "incomplete extraction" in io.out


def test_interrupted_extraction_resumes(tmp_path, capsys, monkeypatch):
    real_write, calls = utils.write_image, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 25:
            raise KeyboardInterrupt
        return real_write(*args, **kwargs)

    monkeypatch.setattr(crop_from_video, "SAVE_SECONDS", 0)  # record after every frame
    monkeypatch.setattr(utils, "write_image", interrupted)
    code, io = run_main(crop_from_video.main, ["--video-path", str(OBAMA), "--save-dir", str(tmp_path / "f"),
                                               "--max-frames", "40"], capsys)
    assert code == 130
    monkeypatch.setattr(utils, "write_image", real_write)
    assert crop_from_video.main(["--video-path", str(OBAMA), "--save-dir", str(tmp_path / "f"),
                                 "--max-frames", "40"]) == 0
    assert "resuming: 2" in capsys.readouterr().out
    meta = json.loads((tmp_path / "f" / "frames.json").read_text())
    assert meta["complete"] and meta["frames"] == list(range(40)) and len(utils.list_images(tmp_path / "f")) == 40


def test_faces_of_re_extracted_frames_are_never_mixed(tmp_path, capsys):
    frames, faces = tmp_path / "frames", tmp_path / "faces"
    crop_from_video.main(["--video-path", str(OBAMA), "--save-dir", str(frames), "--max-frames", "12"])
    crop_face.main(["--images-dir", str(frames), "--faces-dir", str(faces), "--workers", "1"])
    crop_from_video.main(["--video-path", str(REAGAN), "--save-dir", str(frames), "--max-frames", "20",
                          "--overwrite"])
    before = sorted(p.name for p in utils.list_images(faces))
    code, io = run_main(crop_face.main, ["--images-dir", str(frames), "--faces-dir", str(faces), "--workers", "1"],
                        capsys)
    assert code == 1 and "other settings" in io.err and "--overwrite" in io.err
    assert sorted(p.name for p in utils.list_images(faces)) == before
    # a frame changed in place is noticed too
    assert crop_face.main(["--images-dir", str(frames), "--faces-dir", str(faces), "--workers", "1",
                           "--overwrite"]) == 0
    utils.write_image(frames / "000003.png", np.zeros((256, 256, 3), np.uint8))
    code, io = run_main(crop_face.main, ["--images-dir", str(frames), "--faces-dir", str(faces)], capsys)
    assert code == 1 and "changed since these faces were made (e.g. 000003.png)" in io.err


def crop_face_command(frames, faces, *extra):
    return [sys.executable, str(ROOT / "crop_face.py"), "--images-dir", str(frames), "--faces-dir", str(faces),
            "--workers", "1", "--redetect-every", "1", *extra]


@pytest.mark.slow
def test_kill_during_crop_face_then_rerun_ends_with_one_face_per_frame(tmp_path):
    """kill -9 at 20 %, 50 % and 90 % of the faces, then a re-run: one face per frame, a record matching the folder."""
    frames = tmp_path / "frames"
    crop_from_video.main(["--video-path", str(OBAMA), "--save-dir", str(frames), "--max-frames", "300"])
    names = [p.stem for p in utils.list_images(frames)]
    for share in (0.2, 0.5, 0.9):
        faces = tmp_path / f"faces_{share}"
        proc = subprocess.Popen(crop_face_command(frames, faces), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while proc.poll() is None and len(list(faces.glob("*.png"))) < share * len(names):
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert len(list(faces.glob("*.png"))) < len(names), "finished before it could be killed"
        recorded = len(json.loads((faces / records.ALIGNMENTS_NAME).read_text())["frames"])  # saved every few s
        done = subprocess.run(crop_face_command(frames, faces), capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert not recorded or f"resuming: {recorded} frames already processed" in done.stdout
        record = json.loads((faces / records.ALIGNMENTS_NAME).read_text())["frames"]
        assert sorted(record) == sorted(p.name for p in utils.list_images(frames))
        kept = [r["face"] for frame in record.values() for r in frame["faces"] if r["kept"] is True]
        assert sorted(kept) == sorted(p.name for p in utils.list_images(faces))
        assert sorted(f.split("_")[0] for f in kept) == names  # exactly one face per frame
        assert not list(faces.glob(".*.tmp"))


def test_two_runs_on_one_folder(tmp_path):
    """A second crop_face.py on the same faces folder stops at once; the first finishes untouched."""
    frames = tmp_path / "frames"
    crop_from_video.main(["--video-path", str(OBAMA), "--save-dir", str(frames), "--max-frames", "150"])
    faces = tmp_path / "faces"
    first = subprocess.Popen(crop_face_command(frames, faces), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    while not (faces / utils.LOCK_NAME).exists() or not list(faces.glob("*.png")):
        time.sleep(0.02)
    second = subprocess.run(crop_face_command(frames, faces, "--size", "128"), capture_output=True, text=True)
    assert second.returncode == 1 and "in use by another run" in second.stderr
    assert len(second.stderr.strip().splitlines()) == 1
    assert first.wait() == 0
    sizes = {utils.read_image(p).shape[0] for p in utils.list_images(faces)}
    assert sizes == {256} and json.loads((faces / records.ALIGNMENTS_NAME).read_text())["size"] == 256


def test_folder_convert_never_touches_its_input(obama_faces, tiny_model, tmp_path, capsys):
    frames = tmp_path / "frames"
    frames.mkdir()
    for p in utils.list_images(obama_faces / "frames")[:3]:
        utils.write_image(frames / p.name, utils.read_image(p))
    before = {p.name: p.read_bytes() for p in frames.iterdir()}
    for out in (frames, frames / "sub", tmp_path):
        code, io = convert(["--video-path", str(frames), "--model-dir", str(tiny_model), "--output-path", str(out),
                            "--overwrite", "--workers", "1"], capsys)
        assert code == 1 and "input folder" in io.err and "Traceback" not in io.err, out
    assert {p.name: p.read_bytes() for p in frames.iterdir()} == before
    utils.write_image(frames / "000001.jpg", utils.read_image(frames / "000001.png"))
    code, io = convert(["--video-path", str(frames), "--model-dir", str(tiny_model), "--output-path",
                        str(tmp_path / "out"), "--workers", "1"], capsys)
    assert code == 1 and "000001.jpg, 000001.png" in io.err
    assert not (tmp_path / "out").exists()


def test_bad_input_gives_one_line_errors(obama_faces, tiny_model, tmp_path, capsys):
    clip = make_clip(tmp_path / "clip.mp4",
                     [utils.read_image(p) for p in utils.list_images(obama_faces / "frames")[:5]])
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / models.CHECKPOINT).write_bytes(b"")
    (tmp_path / "a_folder.mp4").mkdir()
    base = ["--video-path", str(clip), "--model-dir", str(tiny_model), "--output-path", str(tmp_path / "o.mp4")]
    for extra, message, exit_code in [
            (["--model-dir", str(tmp_path / "empty")], "cannot read checkpoint", 1),
            (["--output-path", str(tmp_path / "a_folder.mp4"), "--overwrite"], "is a folder", 1),
            (["--batch-size", "0"], "must be 1 or more", 2)]:
        code, io = convert(base + extra, capsys)
        assert code == exit_code and message in io.err and "Traceback" not in io.err, extra
    code, io = run_main(evaluate.main, ["--converted-path", str(clip), "--source-path", str(clip), "--every", "0"],
                        capsys)
    assert code == 2 and "must be 1 or more" in io.err
    broken = tmp_path / "frames"
    broken.mkdir()
    utils.write_image(broken / "000000.png", utils.read_image(utils.list_images(obama_faces / "frames")[0]))
    (broken / "000001.png").write_bytes(b"not an image")
    code, io = run_main(evaluate.main, ["--converted-path", str(broken), "--source-path", str(broken),
                                        "--faces-a", str(obama_faces / "faces"),
                                        "--faces-b", str(obama_faces / "faces"),
                                        "--out-dir", str(tmp_path / "e")], capsys)
    assert code == 1 and "cannot read" in io.err and "000001.png" in io.err and "Traceback" not in io.err


def interruptible():
    """In the child before exec: Ctrl-C as in a terminal's foreground job, whatever the test process inherited (an
    ignored or blocked signal stays so in every child). Whether this was why the test failed in two full runs
    is not known; it passed alone every time."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


@pytest.mark.slow
def test_ctrl_c_with_worker_processes_prints_one_line(tmp_path):
    frames = tmp_path / "frames"
    crop_from_video.main(["--video-path", str(OBAMA), "--save-dir", str(frames), "--max-frames", "600"])
    proc = subprocess.Popen([sys.executable, str(ROOT / "crop_face.py"), "--images-dir", str(frames),
                             "--faces-dir", str(tmp_path / "faces"), "--workers", "2", "--redetect-every", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=interruptible)
    # the main process has recorded finished frames (alignments.json, saved every SAVE_SECONDS), and frames are
    # left: faces on disk alone do not say so (imap hands results over in task order, and a worker may be ahead)
    record = tmp_path / "faces" / records.ALIGNMENTS_NAME
    while not (record.is_file() and utils.read_json(record).get("frames")):
        assert proc.poll() is None, "crop_face finished before its record was first saved"
        time.sleep(0.02)
    status = Path(f"/proc/{proc.pid}/status")
    signals = [line for line in status.read_text().splitlines() if line.startswith("Sig")] if status.exists() else []
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal sends Ctrl-C: to every process of the group
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 130 and "Traceback" not in err and err.strip().endswith("interrupted"), (signals, err)
    # the interrupted run saved its record: a re-run resumes
    done = subprocess.run(crop_face_command(frames, tmp_path / "faces"), capture_output=True, text=True)
    assert done.returncode == 0 and "resuming" in done.stdout



@pytest.mark.slow
@pytest.mark.parametrize("signum, code, reason", [(signal.SIGTERM, 143, "stopped (SIGTERM)"),
                                                  (signal.SIGINT, 130, "interrupted (Ctrl-C)")])
def test_a_stop_signal_saves_training(obama_faces, reagan_faces, tmp_path, signum, code, reason):
    """SIGTERM (a batch scheduler's time limit) or Ctrl-C to the whole process group, whose forked batch workers get
    it too: train.py saves the step it reached, says so in one line, no traceback from any process (a stop while a
    worker hands a batch over made one print a traceback) and exits 143 or 130; the same command resumes there."""
    command = [sys.executable, str(ROOT / "train.py"), "--faces-a", str(obama_faces / "faces"), "--faces-b",
               str(reagan_faces / "faces"), "--model-dir", str(tmp_path), "--model", "tiny", "--batch-size", "4",
               "--workers", "2", "--log-every", "1", "--save-every", "100000", "--precision", "fp32"]
    proc = subprocess.Popen(command + ["--iterations", "100000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, preexec_fn=interruptible)
    log = tmp_path / "log.csv"
    while not (log.is_file() and len(log.read_text().splitlines()) > 4):  # a header and some steps
        assert proc.poll() is None, proc.communicate()[1]
        time.sleep(0.05)
    os.killpg(proc.pid, signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code and "Traceback" not in err, err
    step = models.load_checkpoint(tmp_path / models.CHECKPOINT)["step"]
    assert step >= 4 and f"stopped at step {step}: {reason}" in out
    done = subprocess.run(command + ["--iterations", str(step + 2)], capture_output=True, text=True)
    assert done.returncode == 0 and f"resuming at step {step}" in done.stdout, done.stderr
    assert models.load_checkpoint(tmp_path / models.CHECKPOINT)["step"] == step + 2


def test_outputs_get_the_usual_permissions(obama_faces, tiny_model, tmp_path, capsys):
    old = os.umask(0o022)
    try:
        crop_from_video.main(["--video-path", str(OBAMA), "--save-dir", str(tmp_path / "frames"), "--max-frames", "2"])
        code, _ = convert(["--video-path", str(tmp_path / "frames"), "--model-dir", str(tiny_model),
                           "--output-path", str(tmp_path / "out"), "--workers", "1"], capsys)
        assert code == 0
        written = [*utils.list_images(tmp_path / "frames"), tmp_path / "frames" / "frames.json",
                   *utils.list_images(tmp_path / "out"), tiny_model / models.CHECKPOINT]
        assert {oct(p.stat().st_mode & 0o777) for p in written} == {"0o644"}
    finally:
        os.umask(old)


def test_after_a_killed_training_run_temp_files_go_and_the_log_is_cut_back(obama_faces, reagan_faces, tmp_path):
    args = ["--faces-a", str(obama_faces / "faces"), "--faces-b", str(reagan_faces / "faces"), "--model-dir",
            str(tmp_path), "--model", "tiny", "--batch-size", "4", "--workers", "0", "--log-every", "1",
            "--save-every", "3", "--precision", "fp32"]
    assert train.main(args + ["--iterations", "3"]) == 0
    with open(tmp_path / "log.csv", "a") as log:  # what a run killed after step 5 leaves
        log.write("4,0.1,0.1,1.0,1.0\r\n5,0.1,0.1,1.0,1.0\r\n")
    (tmp_path / f".{models.CHECKPOINT}.abc123.tmp").write_bytes(b"half a checkpoint")
    assert train.main(args + ["--iterations", "6"]) == 0
    steps = [int(line.split(",")[0]) for line in (tmp_path / "log.csv").read_text().splitlines()[1:]]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert not list(tmp_path.glob(".*.tmp"))


def test_detection_pool_is_sized_by_memory(monkeypatch):
    monkeypatch.setattr(faces, "available_memory_mb", lambda: 3 * faces.WORKER_MEMORY_MB + 10)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert faces.detection_workers(16) == 3
    monkeypatch.setattr(faces, "available_memory_mb", lambda: 100)
    assert faces.detection_workers(16) == 1
