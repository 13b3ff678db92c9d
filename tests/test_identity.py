"""The person you choose: reference and automatic selection in crop_face.py, curation of blurred faces,
and conversion that swaps only the chosen person in a frame with several people."""
import json

import cv2
import numpy as np
import pytest

from conftest import HAMILTON, OBAMA, PHOTOS, REAGAN, run_main

import align
import convert_video
import crop_face
import crop_from_video
import faces
import records
import utils


def kept(faces_dir):
    record = json.loads((faces_dir / records.ALIGNMENTS_NAME).read_text())["frames"]
    return [r for frame in record.values() for r in frame["faces"] if r["kept"] is True]


def embeddings_of(faces_dir, records):
    embedder = faces.FaceEmbedder()
    out = []
    for r in records:
        face = utils.read_image(faces_dir / r["face"])
        out.append(embedder.embed(face, align.transform_points(r["landmarks"], r["matrix"])))
    return np.array(out)


@pytest.fixture(scope="module")
def hamilton_frames(tmp_path_factory):
    frames = tmp_path_factory.mktemp("hamilton") / "frames"
    crop_from_video.main(["--video-path", str(HAMILTON), "--save-dir", str(frames)])
    return frames


@pytest.mark.slow
def test_reference_keeps_only_that_person_and_automatic_mode_finds_the_same(hamilton_frames, tmp_path, capsys):
    """Without a reference, the person seen in the most frames of a stage clip is kept and a face of each person
    found is saved; with five of the faces kept as --reference, only that person is kept (one face a frame), the
    same faces."""
    assert crop_face.main(["--images-dir", str(hamilton_frames), "--faces-dir", str(tmp_path / "auto")]) == 0
    out = capsys.readouterr().out
    assert "people found; keeping person 1" in out
    people = sorted((tmp_path / "auto" / "people").glob("person*.png"))
    assert len(people) >= 2 and people[0].name.startswith("person1_")
    auto = kept(tmp_path / "auto")
    references = [tmp_path / "auto" / auto[i]["face"] for i in np.linspace(0, len(auto) - 1, 5).astype(int)]
    assert crop_face.main(["--images-dir", str(hamilton_frames), "--faces-dir", str(tmp_path / "ref"),
                           "--reference", *map(str, references)]) == 0
    chosen = kept(tmp_path / "ref")
    targets = faces.reference_embeddings(references)
    distances = np.linalg.norm(embeddings_of(tmp_path / "ref", chosen)[:, None] - targets[None], axis=2).min(1)
    assert len(chosen) >= 60 and (distances < 0.6).all()  # only him (the embedding check)
    assert len({r["frame"] for r in chosen}) == len(chosen)  # one face per frame
    rejected = [r for frame in json.loads((tmp_path / "ref" / records.ALIGNMENTS_NAME).read_text())["frames"].values()
                for r in frame["faces"] if r["kept"] == "another person"]
    assert rejected and all((tmp_path / "ref" / "rejected" / r["face"]).exists() for r in rejected)
    # the automatic choice is the same man
    distances = np.linalg.norm(embeddings_of(tmp_path / "auto", auto)[:, None] - targets[None], axis=2).min(1)
    assert (distances < 0.6).mean() >= 0.95 and len(auto) >= 0.9 * len(chosen)


@pytest.mark.parametrize("photo", ["two_people.jpg", "obama_and_biden.jpg"])
def test_reference_keeps_obama_in_two_person_photos(photo, tmp_path):
    (tmp_path / "frames").mkdir()
    utils.write_image(tmp_path / "frames" / "000000.png", utils.read_image(PHOTOS / photo))
    assert crop_face.main(["--images-dir", str(tmp_path / "frames"), "--faces-dir", str(tmp_path / "faces"),
                           "--reference", str(PHOTOS / "obama.jpg"), "--workers", "1", "--upsample", "1"]) == 0
    (face,) = kept(tmp_path / "faces")
    obama = faces.reference_embeddings([PHOTOS / "obama.jpg"])[0]
    biden = faces.reference_embeddings([PHOTOS / "biden2.jpg"])[0]
    mine = embeddings_of(tmp_path / "faces", [face])[0]
    assert np.linalg.norm(mine - obama) < 0.6 < np.linalg.norm(mine - biden)
    others = utils.list_images(tmp_path / "faces" / "rejected")  # Biden (and anyone else in the crowd)
    assert others and all(np.linalg.norm(e - obama) > 0.6 for e in faces.reference_embeddings(others))


def test_curation_rejects_blurred_faces_and_keeps_the_clip(tmp_path, capsys):
    """Motion-blurred copies of frames are rejected; the clip's own faces are kept; a face moved back by hand stays."""
    frames = tmp_path / "frames"
    crop_from_video.main(["--video-path", str(OBAMA), "--save-dir", str(frames), "--max-frames", "100"])
    kernel = np.zeros((15, 15), np.float32)
    kernel[7, :] = 1 / 15  # horizontal motion blur
    for i in range(0, 100, 10):
        utils.write_image(frames / f"blur{i:03d}.png", cv2.filter2D(utils.read_image(frames / f"{i:06d}.png"), -1,
                                                                     kernel))
    assert crop_face.main(["--images-dir", str(frames), "--faces-dir", str(tmp_path / "faces")]) == 0
    assert "10 blurred" in capsys.readouterr().out
    names = {r["face"] for r in kept(tmp_path / "faces")}
    blurred_kept = [n for n in names if n.startswith("blur")]
    own_kept = [n for n in names if not n.startswith("blur")]
    assert len(blurred_kept) <= 1 and len(own_kept) >= 95  # >= 90 % of the blurred out, < 5 % of the clip's
    assert {p.name for p in utils.list_images(tmp_path / "faces")} == names
    # a face moved back by hand is kept by the next run
    (tmp_path / "faces" / "rejected" / "blur000_0.png").rename(tmp_path / "faces" / "blur000_0.png")
    assert crop_face.main(["--images-dir", str(frames), "--faces-dir", str(tmp_path / "faces")]) == 0
    assert "blur000_0.png" in {r["face"] for r in kept(tmp_path / "faces")}
    assert (tmp_path / "faces" / "blur000_0.png").exists()


def test_one_person_clip_keeps_every_frame_as_before(obama_faces):
    """On a single-person clip every frame's face is kept, as before (no clustering, nothing rejected)."""
    assert len(kept(obama_faces / "faces")) == 120
    assert not utils.list_images(obama_faces / "faces" / "rejected")


@pytest.mark.parametrize("by", ["reference", "checkpoint"])
def test_conversion_of_a_two_person_photo_swaps_only_the_chosen_person(by, tiny_model, tmp_path, capsys):
    """--reference obama.jpg, or by default the person the model was trained on (Obama, A): Biden is untouched."""
    (tmp_path / "in").mkdir()
    image = utils.read_image(PHOTOS / "two_people.jpg")
    utils.write_image(tmp_path / "in" / "two.png", image)
    analyzer = faces.FaceAnalyzer(upsample=1)
    found = analyzer.analyze(image, all_faces=True)
    obama = faces.reference_embeddings([PHOTOS / "obama.jpg"])[0]
    embedder = faces.FaceEmbedder()
    by_distance = sorted(found, key=lambda f: np.linalg.norm(embedder.embed(image, f[1]) - obama))
    (obama_box, _), (biden_box, _) = by_distance
    extra = ["--reference", str(PHOTOS / "obama.jpg")] if by == "reference" else []
    code, io = run_main(convert_video.main, ["--video-path", str(tmp_path / "in"), "--model-dir", str(tiny_model),
                                             "--output-path", str(tmp_path / "out"), "--workers", "1",
                                             "--upsample", "1", *extra], capsys)
    assert code == 0, io.err
    diff = np.abs(utils.read_image(tmp_path / "out" / "two.png").astype(int) - image).sum(2)

    def region(box):
        l, t, r, b = (int(v) for v in box)
        return diff[t:b, l:r]
    assert (region(obama_box) > 10).mean() > 0.2  # Obama's face was replaced
    assert (region(biden_box) == 0).all()  # Biden's face: every pixel as it was


def test_a_cut_to_another_person_is_not_taken_for_the_same_face(tmp_path):
    """Frames of Obama, then a cut to Andrew Ng where Obama's face was: Andrew's faces get their own
    identity (not the one carried along Obama's track), so the person of the most frames is kept alone."""
    frames = tmp_path / "frames"
    frames.mkdir()
    for video, first, count in ((OBAMA, 0, 40), (REAGAN, 40, 20)):
        crop_from_video.main(["--video-path", str(video), "--save-dir", str(tmp_path / video.stem),
                              "--max-frames", str(count)])
        for k, path in enumerate(utils.list_images(tmp_path / video.stem)):
            path.rename(frames / f"{first + k:05d}.png")
    assert crop_face.main(["--images-dir", str(frames), "--faces-dir", str(tmp_path / "faces"),
                           "--workers", "1"]) == 0
    record = json.loads((tmp_path / "faces" / records.ALIGNMENTS_NAME).read_text())["frames"]
    verdicts = [[r["kept"] for r in record[f"{k:05d}.png"]["faces"]] for k in range(60)]
    assert all(v == [True] for v in verdicts[:40])
    assert all(v == ["another person"] for v in verdicts[40:])
