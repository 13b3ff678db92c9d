"""Steps 1-2 on real clips: frames out of a video, aligned faces out of frames, and bad input."""
import json
import os

import numpy as np
import pytest

from conftest import OBAMA, PHOTOS, REAGAN, run_main

import align
import crop_face
import crop_from_video
import records
import utils


def test_frames_are_padded_sorted_and_described(tmp_path):
    out = tmp_path / "frames"
    assert crop_from_video.main(["--video-path", str(OBAMA), "--save-dir", str(out), "--every", "3",
                                 "--max-frames", "10", "--format", "jpg"]) == 0
    names = [p.name for p in utils.list_images(out)]
    assert names == [f"{i:06d}.jpg" for i in range(0, 30, 3)]
    meta = json.loads((out / "frames.json").read_text())
    assert meta["frames"] == list(range(0, 30, 3))
    assert (meta["width"], meta["height"], meta["fps"]) == (256, 256, 30.0)
    assert utils.read_image(out / names[0]).shape == (256, 256, 3)
    # every setting recorded is one that identifies the frames (resume and crop_face.py read the same keys)
    record = crop_from_video.source_record(crop_from_video.parse_args(["--video-path", str(OBAMA)]), None)
    assert set(record) - {"source"} == set(records.FRAMES_SOURCE_KEYS)
    assert {k: meta[k] for k in records.FRAMES_SOURCE_KEYS} == crop_face.frames_identity(out)


def test_time_range_selects_frames(tmp_path):
    out = tmp_path / "frames"
    crop_from_video.main(["--video-path", str(OBAMA), "--save-dir", str(out), "--start", "1", "--end", "1.5"])
    assert [int(p.stem) for p in utils.list_images(out)] == list(range(30, 45))


def test_never_mixes_two_videos(tmp_path, capsys):
    out = tmp_path / "frames"
    crop_from_video.main(["--video-path", str(OBAMA), "--save-dir", str(out), "--max-frames", "3"])
    code, io = run_main(crop_from_video.main, ["--video-path", str(REAGAN), "--save-dir", str(out),
                                                "--max-frames", "3"], capsys)
    err = io.err
    assert code == 1 and "already holds 3 images" in err and "Traceback" not in err
    # the same video and settings again is a no-op, even from a copy elsewhere with another time; --overwrite
    # replaces
    assert crop_from_video.main(["--video-path", str(OBAMA), "--save-dir", str(out), "--max-frames", "3"]) == 0
    copy = tmp_path / "copied" / OBAMA.name
    copy.parent.mkdir()
    copy.write_bytes(OBAMA.read_bytes())
    os.utime(copy, (1e9, 1e9))
    capsys.readouterr()
    assert crop_from_video.main(["--video-path", str(copy), "--save-dir", str(out), "--max-frames", "3"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    # a video that differs only in its last bytes is another video
    edited = tmp_path / "edited.mp4"
    data = OBAMA.read_bytes()
    edited.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    code, io = run_main(crop_from_video.main, ["--video-path", str(edited), "--save-dir", str(out),
                                                "--max-frames", "3"], capsys)
    assert code == 1 and "already holds 3 images" in io.err
    assert crop_from_video.main(["--video-path", str(REAGAN), "--save-dir", str(out), "--max-frames", "2",
                                 "--overwrite"]) == 0
    assert len(utils.list_images(out)) == 2
    assert json.loads((out / "frames.json").read_text())["source"].endswith(REAGAN.name)


# Fixed bytes, not os.urandom: a rare random buffer (1 of 16,762 tried) probes as a raw H.263 stream with a frame.
NOISE = np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes()


@pytest.mark.parametrize("content, message", [
    (None, "video not found"), (b"", "cannot open"), (NOISE, "cannot open")])
def test_bad_videos_give_one_line_errors(tmp_path, capsys, content, message):
    video = tmp_path / "clip.mp4"
    if content is not None:
        video.write_bytes(content)
    code, io = run_main(crop_from_video.main, ["--video-path", str(video),
                                                "--save-dir", str(tmp_path / "out")], capsys)
    err = io.err
    assert code == 1 and message in err and len(err.strip().splitlines()) == 1


def test_unwritable_save_dir(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code, io = run_main(crop_from_video.main, ["--video-path", str(OBAMA), "--save-dir", str(blocker / "x")],
                         capsys)
    err = io.err
    assert code == 1 and "cannot write" in err


def template_eye_centres(size=align.FACE_SIZE, coverage=align.FACE_COVERAGE):
    """Where the template puts the eye centres in an aligned face (pixels)."""
    inner = size * coverage
    points = np.zeros((68, 2))
    points[align.ALIGN_POINTS] = align.MEAN_FACE * inner + (size - inner) / 2
    return align.eye_centres(points)


def kept_faces(frame):
    """The face records of one frame of alignments.json that were kept."""
    return [r for r in frame["faces"] if r["kept"] is True]


def test_faces_found_and_eyes_aligned(obama_faces, reagan_faces):
    """>= 98% of frames have a face; eye centres stay put across frames and near the template."""
    tl, tr = template_eye_centres()
    for root in (obama_faces, reagan_faces):
        data = json.loads((root / "faces" / records.ALIGNMENTS_NAME).read_text())
        frames = {name: kept_faces(frame) for name, frame in data["frames"].items()}
        assert len(frames) == 120
        assert sum(1 for recs in frames.values() if recs) / len(frames) >= 0.98
        eyes = []
        for recs in frames.values():
            for r in recs:
                face = utils.read_image(root / "faces" / r["face"])
                assert face.shape == (256, 256, 3)
                eyes.append(np.concatenate(align.eye_centres(align.transform_points(r["landmarks"], r["matrix"]))))
        eyes = np.array(eyes)
        spread = np.linalg.norm((eyes - eyes.mean(0)).reshape(-1, 2, 2), axis=2).max(1)
        assert spread.mean() <= 3.0, f"eye centres wander {spread.mean():.2f} px across frames"
        to_template = np.linalg.norm((eyes - np.concatenate([tl, tr])).reshape(-1, 2, 2), axis=2).max(1)
        assert np.median(to_template) <= 8.0, f"eyes {np.median(to_template):.2f} px off the template"


def test_alignment_matrix_matches_saved_face(obama_faces):
    """The stored matrix reproduces the stored face from the source frame (tools can rely on it)."""
    data = json.loads((obama_faces / "faces" / records.ALIGNMENTS_NAME).read_text())
    rec = kept_faces(data["frames"]["000010.png"])[0]
    frame = utils.read_image(obama_faces / "frames" / "000010.png")
    again = align.warp_face(frame, np.array(rec["matrix"]), 256)
    saved = utils.read_image(obama_faces / "faces" / rec["face"])
    assert np.abs(again.astype(int) - saved).mean() < 1.0


def test_crop_face_resumes_and_refuses_to_mix(obama_faces, tmp_path, capsys):
    frames = obama_faces / "frames"
    # resume: nothing left to do, faces untouched
    before = {p.name: p.stat().st_mtime_ns for p in utils.list_images(obama_faces / "faces")}
    assert crop_face.main(["--images-dir", str(frames), "--faces-dir", str(obama_faces / "faces")]) == 0
    assert "resuming: 120 frames already processed, 0 to go" in capsys.readouterr().out
    assert before == {p.name: p.stat().st_mtime_ns for p in utils.list_images(obama_faces / "faces")}
    # another frames folder into the same faces folder is refused
    other = tmp_path / "other"
    other.mkdir()
    utils.write_image(other / "000000.png", utils.read_image(frames / "000000.png"))
    code, io = run_main(crop_face.main, ["--images-dir", str(other), "--faces-dir", str(obama_faces / "faces")],
                         capsys)
    err = io.err
    assert code == 1 and "already holds" in err


def test_crop_face_bad_inputs(tmp_path, capsys):
    code, io = run_main(crop_face.main, ["--images-dir", str(tmp_path / "nope"), "--faces-dir",
                                          str(tmp_path / "f")], capsys)
    err = io.err
    assert code == 1 and "frames folder not found" in err
    (tmp_path / "empty").mkdir()
    code, io = run_main(crop_face.main, ["--images-dir", str(tmp_path / "empty"), "--faces-dir",
                                          str(tmp_path / "f")], capsys)
    err = io.err
    assert code == 1 and "no images" in err
    # an unreadable image is skipped with a warning; a blank frame has no face -> clear error
    (tmp_path / "frames").mkdir()
    (tmp_path / "frames" / "000000.png").write_bytes(b"not a png")
    utils.write_image(tmp_path / "frames" / "000001.png", np.full((200, 200, 3), 128, np.uint8))
    code, io = run_main(crop_face.main, ["--images-dir", str(tmp_path / "frames"), "--faces-dir",
                                               str(tmp_path / "f"), "--workers", "1"], capsys)
    err, out = io.err, io.out
    assert code == 1 and "no faces found" in err
    assert "skipped unreadable image 000000.png" in out and "1 frames without a face, 1 unreadable" in out
    data = json.loads((tmp_path / "f" / "alignments.json").read_text())
    assert list(data["frames"]) == ["000001.png"] and data["frames"]["000001.png"]["faces"] == []


def test_several_faces_largest_or_all(tmp_path):
    image = PHOTOS / "two_people.jpg"
    (tmp_path / "frames").mkdir()
    utils.write_image(tmp_path / "frames" / "000000.png", utils.read_image(image))
    crop_face.main(["--images-dir", str(tmp_path / "frames"), "--faces-dir", str(tmp_path / "one"), "--workers", "1"])
    crop_face.main(["--images-dir", str(tmp_path / "frames"), "--faces-dir", str(tmp_path / "all"), "--workers", "1",
                    "--all-faces"])
    one = kept_faces(json.loads((tmp_path / "one" / "alignments.json").read_text())["frames"]["000000.png"])
    every = kept_faces(json.loads((tmp_path / "all" / "alignments.json").read_text())["frames"]["000000.png"])
    assert len(one) == 1 and len(every) == 2
    area = [(b[2] - b[0]) * (b[3] - b[1]) for b in (r["box"] for r in every)]
    assert one[0]["box"] == every[int(np.argmax(area))]["box"]


def test_bad_landmarks_model(tmp_path, capsys, obama_faces):
    code, io = run_main(crop_face.main, ["--images-dir", str(obama_faces / "frames"), "--faces-dir",
                                          str(tmp_path / "f"), "--landmarks-model", str(tmp_path / "x.dat")], capsys)
    err = io.err
    assert code == 1 and "landmarks model not found" in err


def test_umeyama_recovers_a_similarity_and_never_reflects():
    rng = np.random.default_rng(0)
    src = rng.normal(size=(51, 2)) * 40
    angle, scale, shift = 0.7, 1.8, np.array([12.0, -5.0])
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    fit = align.umeyama(src, src @ (scale * rotation).T + shift)
    assert np.allclose(fit[:2], np.hstack([scale * rotation, shift[:, None]]), atol=1e-9)
    assert np.allclose(align.umeyama(src, src @ rotation.T, estimate_scale=False)[:2, :2], rotation, atol=1e-9)
    # a mirrored target: the best proper rotation (determinant > 0), as Umeyama's SVD form gives
    mirrored = align.umeyama(src, src * [-1, 1])[:2, :2]
    assert np.linalg.det(mirrored) > 0
    assert np.isnan(align.umeyama(np.ones((5, 2)), src[:5])).all()  # all points in one place: no fit
