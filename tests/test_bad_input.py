"""A careless or hostile user's input: several people with faces followed, the user's own files kept, a full disk,
records of the wrong shape, bad flag values. Each is a one-line error and a non-zero exit, or works; nothing is
lost."""
import errno
import json

import cv2
import numpy as np
import pytest
import torch

from conftest import OBAMA, PHOTOS, make_clip, run_main

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


def drifting_frames(photo, count=30, step=1.5):
    """`count` frames of a photo moving slowly right and down (a camera pan): faces are followed, not re-found."""
    image = utils.read_image(photo)
    frames = []
    for k in range(count):
        shift = np.float32([[1, 0, k * step], [0, 1, k * step / 2]])
        frames.append(cv2.warpAffine(image, shift, image.shape[1::-1], borderMode=cv2.BORDER_REPLICATE))
    return frames


@pytest.fixture(scope="module")
def two_people(tmp_path_factory):
    """30 drifting frames of Obama and Biden side by side, as a folder of PNGs and as an MP4; and where Biden is."""
    root = tmp_path_factory.mktemp("two_people")
    frames = drifting_frames(PHOTOS / "two_people.jpg")
    (root / "frames").mkdir()
    for k, frame in enumerate(frames):
        utils.write_image(root / "frames" / f"{k:03d}.png", frame)
    make_clip(root / "clip.mp4", frames)
    obama = faces.reference_embeddings([PHOTOS / "obama.jpg"])[0]
    analyzer, embedder = faces.FaceAnalyzer(upsample=1), faces.FaceEmbedder()
    found = analyzer.analyze(frames[0], all_faces=True)
    biden = max(found, key=lambda f: np.linalg.norm(embedder.embed(frames[0], f[1]) - obama))
    return root, frames, biden[1]


def region(landmarks, shape, grow=1.3):
    """A box around a face's landmarks, grown by `grow`, as slices."""
    centre, half = landmarks.mean(0), (landmarks.max(0) - landmarks.min(0)).max() * grow / 2
    (x0, y0), (x1, y1) = np.maximum(centre - half, 0).astype(int), np.minimum(centre + half, shape[1::-1]).astype(int)
    return slice(y0, y1), slice(x0, x1)


@pytest.mark.parametrize("by, workers", [("reference", "1"), pytest.param("checkpoint", "1", marks=pytest.mark.slow),
                                        pytest.param("reference", "2", marks=pytest.mark.slow),
                                        pytest.param("checkpoint", "2", marks=pytest.mark.slow)])
def test_several_people_with_faces_followed(by, workers, two_people, tiny_model, tmp_path, capsys):
    """Faces followed from frame to frame in a two-person video: with --reference, or by the checkpoint's own
    identity (Obama is the model's person A), with one or two workers. Only Obama's face changes; Biden's pixels
    are the input's, in every frame."""
    root, frames, biden = two_people
    extra = ["--reference", str(PHOTOS / "obama.jpg")] if by == "reference" else []
    code, io = run_main(convert_video.main, ["--video-path", str(root / "frames"), "--model-dir", str(tiny_model),
                                             "--output-path", str(tmp_path / "out"), "--workers", workers,
                                             "--upsample", "1", *extra], capsys)
    assert code == 0 and "Traceback" not in io.err, io.err
    assert "30 frames (30 with a swapped face, 0 passed through)" in io.out
    for k, frame in enumerate(frames):
        out = utils.read_image(tmp_path / "out" / f"{k:03d}.png")
        around_biden = region(biden + [k * 1.5, k * 0.75], frame.shape)
        assert np.array_equal(out[around_biden], frame[around_biden]), k
        assert (out != frame).any()  # Obama's face was swapped
    # the same as a video (the reported crash: faces followed through an MP4 with a reference photo)
    code, io = run_main(convert_video.main, ["--video-path", str(root / "clip.mp4"), "--model-dir", str(tiny_model),
                                             "--output-path", str(tmp_path / "out.mp4"), "--workers", workers,
                                             "--upsample", "1", *extra], capsys)
    assert code == 0 and "30 with a swapped face" in io.out, io.err
    assert video.video_info(tmp_path / "out.mp4")["frames"] == 30


def test_reference_on_a_followed_one_person_video(tiny_model, tmp_path, capsys):
    """The reported crash as such: --reference on a one-person video whose face is followed between detections."""
    code, io = run_main(convert_video.main, ["--video-path", str(OBAMA), "--model-dir", str(tiny_model),
                                             "--output-path", str(tmp_path / "o.mp4"), "--max-frames", "10",
                                             "--reference", str(PHOTOS / "obama.jpg"), "--workers", "1"], capsys)
    assert code == 0 and "10 frames (10 with a swapped face" in io.out, io.err


def test_crop_face_keeps_faces_the_user_added(obama_faces, tmp_path, capsys):
    """A face copied into a faces folder by hand survives a re-run (and --overwrite), and the run says so."""
    folder = tmp_path / "faces"
    frames = obama_faces / "frames"
    assert crop_face.main(["--images-dir", str(frames), "--faces-dir", str(folder), "--workers", "1"]) == 0
    mine = folder / "my_own_face.png"
    mine.write_bytes((folder / "000000_0.png").read_bytes())
    capsys.readouterr()
    assert crop_face.main(["--images-dir", str(frames), "--faces-dir", str(folder), "--workers", "1"]) == 0
    assert mine.exists() and "1 images in" in capsys.readouterr().out
    assert crop_face.main(["--images-dir", str(frames), "--faces-dir", str(folder), "--workers", "1",
                           "--overwrite"]) == 0
    assert mine.exists() and (folder / "000000_0.png").exists()


def test_overwrite_deletes_only_what_the_record_lists(obama_faces, tmp_path, capsys):
    """--overwrite replaces the project's own frames and faces; the user's photos stay, in the folder and behind a
    rejected/ that is a link to a photo folder."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for k in range(3):
        utils.write_image(photos / f"holiday{k}.jpg", np.full((32, 32, 3), 40 * k, np.uint8))
    frames = tmp_path / "frames"
    assert crop_from_video.main(["--video-path", str(OBAMA), "--save-dir", str(frames), "--max-frames", "4"]) == 0
    utils.write_image(frames / "my_photo.jpg", np.zeros((16, 16, 3), np.uint8))
    assert crop_from_video.main(["--video-path", str(OBAMA), "--save-dir", str(frames), "--max-frames", "3",
                                 "--overwrite"]) == 0
    assert (frames / "my_photo.jpg").exists() and not (frames / "000003.png").exists()
    (frames / "my_photo.jpg").unlink()
    folder = tmp_path / "faces"
    folder.mkdir()
    (folder / "rejected").symlink_to(photos)
    code, io = run_main(crop_face.main, ["--images-dir", str(frames), "--faces-dir", str(folder), "--workers", "1"],
                        capsys)
    assert code == 1 and "is a link" in io.err  # it will not move rejected faces through a link into the photos
    code, io = run_main(crop_face.main, ["--images-dir", str(frames), "--faces-dir", str(folder), "--workers", "1",
                                         "--overwrite"], capsys)
    assert code == 1 and "is a link" in io.err
    assert sorted(p.name for p in photos.iterdir()) == ["holiday0.jpg", "holiday1.jpg", "holiday2.jpg"]


def test_convert_keeps_the_users_json_beside_the_output(tiny_model, tmp_path, capsys):
    mine = tmp_path / "clip.json"
    mine.write_text('{"mine": 1}')
    args = ["--video-path", str(OBAMA), "--model-dir", str(tiny_model), "--output-path", str(tmp_path / "clip.mp4"),
            "--max-frames", "3", "--workers", "1"]
    for extra in ([], ["--overwrite"]):
        code, io = run_main(convert_video.main, args + extra, capsys)
        assert code == 1 and "clip.json exists" in io.err and "move it away" in io.err
    assert json.loads(mine.read_text()) == {"mine": 1} and not (tmp_path / "clip.mp4").exists()
    mine.unlink()
    assert run_main(convert_video.main, args, capsys)[0] == 0
    # its own record is replaced with --overwrite, and only then
    code, io = run_main(convert_video.main, args, capsys)
    assert code == 1 and "exists; pass --overwrite" in io.err
    assert run_main(convert_video.main, args + ["--overwrite"], capsys)[0] == 0


def full_disk(monkeypatch):
    """Every atomic write of the project finds the disk full (as on a full 3 MB tmpfs)."""
    real = utils.os.fdopen

    class Full:
        def __init__(self, fd, mode):
            self.file = real(fd, mode)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(utils.os, "fdopen", Full)


def test_a_full_disk_is_one_line_and_loses_nothing(obama_faces, reagan_faces, tiny_model, tmp_path, capsys,
                                                   monkeypatch):
    model_dir = tmp_path / "model"
    args = ["--faces-a", str(obama_faces / "faces"), "--faces-b", str(reagan_faces / "faces"), "--model-dir",
            str(model_dir), "--model", "tiny", "--batch-size", "4", "--workers", "0", "--iterations", "1"]
    assert train.main(args) == 0
    before = (model_dir / models.CHECKPOINT).read_bytes()
    capsys.readouterr()
    with monkeypatch.context() as m:
        full_disk(m)
        for main, argv in ((train.main, args[:-1] + ["2"]),
                           (crop_from_video.main, ["--video-path", str(OBAMA), "--save-dir", str(tmp_path / "f"),
                                                   "--max-frames", "2"]),
                           (crop_face.main, ["--images-dir", str(obama_faces / "frames"), "--faces-dir",
                                             str(tmp_path / "faces"), "--workers", "1"])):
            code, io = run_main(main, argv, capsys)
            assert code == 1 and "the disk is full" in io.err and "Traceback" not in io.err, io.err
            assert [line for line in io.err.splitlines() if "error" in line] == [io.err.splitlines()[-1]], io.err
    assert (model_dir / models.CHECKPOINT).read_bytes() == before  # the old checkpoint is intact
    assert not list(tmp_path.rglob("*.tmp"))  # and no temp file is left

    def encoder_full(self, image, frame=None):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.tmp))

    monkeypatch.setattr(video.VideoWriter, "write", encoder_full)
    code, io = run_main(convert_video.main, ["--video-path", str(OBAMA), "--model-dir", str(tiny_model),
                                             "--output-path", str(tmp_path / "o.mp4"), "--max-frames", "3",
                                             "--workers", "1"], capsys)
    assert code == 1 and "the disk is full writing" in io.err and "Traceback" not in io.err, io.err
    assert not (tmp_path / "o.mp4").exists() and not list(tmp_path.glob(".o.mp4*"))


@pytest.mark.parametrize("content", ["[]", "null", '{"frames": {"000000.png": {"stat": [1, 2]}}}',
                                     '{"frames": []}', "not json"])
def test_records_of_the_wrong_shape_are_one_line(content, obama_faces, reagan_faces, tmp_path, capsys):
    """alignments.json and frames.json that are valid JSON (or not) of the wrong shape: each step that reads them
    says which file, in one line."""
    faces_dir, frames_dir = tmp_path / "faces", tmp_path / "frames"
    faces_dir.mkdir()
    frames_dir.mkdir()
    for k in range(3):
        (faces_dir / f"{k}.png").write_bytes((obama_faces / "faces" / "000000_0.png").read_bytes())
        (frames_dir / f"{k:06d}.png").write_bytes((obama_faces / "frames" / "000000.png").read_bytes())
    (faces_dir / records.ALIGNMENTS_NAME).write_text(content)
    (frames_dir / records.FRAMES_NAME).write_text(content)
    runs = [(train.main, ["--faces-a", str(faces_dir), "--faces-b", str(reagan_faces / "faces"), "--model-dir",
                          str(tmp_path / "m"), "--iterations", "1", "--workers", "0"]),
            (crop_face.main, ["--images-dir", str(frames_dir), "--faces-dir", str(faces_dir), "--workers", "1"]),
            (crop_face.main, ["--images-dir", str(frames_dir), "--faces-dir", str(tmp_path / "new"), "--workers",
                              "1"]),
            (crop_from_video.main, ["--video-path", str(OBAMA), "--save-dir", str(frames_dir), "--max-frames", "2"])]
    for main, argv in runs:
        code, io = run_main(main, argv, capsys)
        assert code == 1 and "Traceback" not in io.err, (main.__module__, io.err)
        assert (records.ALIGNMENTS_NAME in io.err or records.FRAMES_NAME in io.err), (main.__module__, io.err)


def test_a_hand_edited_checkpoint_is_one_line(obama_faces, reagan_faces, tmp_path, capsys):
    args = ["--faces-a", str(obama_faces / "faces"), "--faces-b", str(reagan_faces / "faces"), "--model-dir",
            str(tmp_path), "--model", "tiny", "--batch-size", "4", "--workers", "0", "--iterations", "1"]
    assert train.main(args) == 0
    ckpt = models.load_checkpoint(tmp_path / models.CHECKPOINT)
    ckpt["step"] = "five"
    torch.save(ckpt, tmp_path / models.CHECKPOINT)
    code, io = run_main(train.main, args[:-1] + ["3"], capsys)
    assert code == 1 and "is damaged" in io.err and "Traceback" not in io.err
    ckpt["step"], ckpt["reach"]["b"] = 1, torch.zeros(3, 3)  # where B's decoder was trained: of the wrong size
    torch.save(ckpt, tmp_path / models.CHECKPOINT)
    code, io = run_main(convert_video.main, ["--video-path", str(obama_faces / "frames"), "--model-dir",
                                             str(tmp_path), "--output-path", str(tmp_path / "out")], capsys)
    assert code == 1 and "is damaged" in io.err and "Traceback" not in io.err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("main, argv, message", [
    (train.main, ["--lr", "-1"], "--lr: must be a number >= 0"),
    (train.main, ["--lr", "nan"], "--lr: must be a number >= 0"),
    (train.main, ["--minutes", "-1"], "--minutes: must be a number >= 0"),
    (train.main, ["--no-warp-last", "2"], "--no-warp-last: must be a number from 0 to 1"),
    (train.main, ["--faces-a", "x", "--faces-b", "x"], "share a folder"),
    (crop_face.main, ["--size", "100000"], "--size: must be from 32 to 2048"),
    (convert_video.main, ["--crf", "60"], "--crf: must be from 0 to 51"),
    (convert_video.main, ["--mask-blur", "-1"], "--mask-blur: must be a number >= 0"),
    (convert_video.main, ["--smooth", "1"], "--smooth: must be a number from 0 up to (not including) 1"),
])
def test_bad_flag_values_are_usage_errors(main, argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and "Traceback" not in err


def test_a_folder_input_wants_a_folder_output(obama_faces, tiny_model, tmp_path, capsys):
    code, io = run_main(convert_video.main, ["--video-path", str(obama_faces / "frames"), "--model-dir",
                                             str(tiny_model), "--output-path", str(tmp_path / "x.mp4")], capsys)
    assert code == 1 and "looks like a video file" in io.err and not (tmp_path / "x.mp4").exists()


def test_evaluate_refuses_a_bad_checkpoint_before_measuring(obama_faces, reagan_faces, tmp_path, capsys,
                                                            monkeypatch):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / models.CHECKPOINT).write_bytes(b"\x80\x02}q\x00.")  # a pickle, not a checkpoint
    monkeypatch.setattr(evaluate, "measure_frames", lambda *a: pytest.fail("frames measured first"))
    code, io = run_main(evaluate.main, ["--converted-path", str(obama_faces / "frames"), "--source-path",
                                        str(obama_faces / "frames"), "--faces-a", str(obama_faces / "faces"),
                                        "--faces-b", str(reagan_faces / "faces"), "--heldout-b",
                                        str(reagan_faces / "faces"), "--model-dir", str(tmp_path / "m")], capsys)
    assert code == 1 and "not a checkpoint of this project" in io.err
    assert "weights_only" not in io.err and len(io.err.strip().splitlines()) == 1
