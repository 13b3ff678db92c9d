"""evaluate.py's metrics on known cases, and a run on real frames."""
import json
import os
import shutil

import cv2
import numpy as np
import pytest
import torch

from conftest import OBAMA, PHOTOS, SHARED, make_clip

import align
import evaluate
import faces
import tensors
import utils
import video

HILL = SHARED / "videos" / "sadtalker_WDA_KatieHill_000.mp4"  # a 512 px talking head, where ../shared has it


def test_identical_images_zero_landmark_error_and_infinite_psnr():
    pts = np.random.default_rng(0).uniform(0, 100, (68, 2))
    assert evaluate.landmark_error(pts, pts) == 0.0
    assert evaluate.landmark_error(pts, pts + [3, 4]) == pytest.approx(5 / np.linalg.norm(pts[36] - pts[45]))
    img = np.random.default_rng(1).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    assert evaluate.psnr(img, img) == float("inf")
    assert evaluate.psnr(img, np.clip(img.astype(int) + 1, 0, 255).astype(np.uint8)) > 45
    x = torch.rand(2, 3, 32, 32)
    assert float(tensors.ssim(x, x)) == pytest.approx(1.0, abs=1e-5)
    assert float(tensors.ssim(x, torch.rand(2, 3, 32, 32))) < 0.2


def test_identity_distances_on_real_photos():
    analyzer, embedder = faces.FaceAnalyzer(), faces.FaceEmbedder()

    def embed(name):
        image = utils.read_image(PHOTOS / name)
        (_, landmarks), = analyzer.analyze(image)
        return embedder.embed(image, landmarks)

    obama, obama2, biden = embed("obama.jpg"), embed("obama2.jpg"), embed("biden2.jpg")
    assert np.linalg.norm(obama - obama) < 1e-6
    assert np.linalg.norm(obama - obama2) < 0.6  # same person, other photo
    assert np.linalg.norm(obama - biden) > 0.6   # two different people


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    """A small gallery: Obama from two photos, Biden from one photo (his other
    photo is left out, for test_another_gallery_person_is_retrieved)."""
    folder = tmp_path_factory.mktemp("gallery")
    people = {"obama": ["obama.jpg", "obama2.jpg"], "biden": ["biden2.jpg"]}
    for person, files in people.items():
        (folder / person).mkdir()
        for f in files:
            (folder / person / f).symlink_to(PHOTOS / f)
    return folder


def test_gallery_cache_keeps_each_person_as_it_is_computed(gallery, tmp_path, monkeypatch):
    folder = tmp_path / "gallery"
    for person in ("biden", "obama"):
        (folder / person).mkdir(parents=True)
        for f in (gallery / person).iterdir():
            shutil.copy(f, folder / person / f.name)
    analyzer, embedder = faces.FaceAnalyzer(), faces.FaceEmbedder()
    real, computed = evaluate.gallery_embedding, []

    def interrupted_at_obama(files, *models):
        if files[0].parent.name == "obama":
            raise KeyboardInterrupt
        computed.append(files[0].parent.name)
        return real(files, *models)

    monkeypatch.setattr(evaluate, "gallery_embedding", interrupted_at_obama)
    with pytest.raises(KeyboardInterrupt):
        evaluate.load_gallery(folder, analyzer, embedder)
    assert json.loads((folder / ".embeddings.json").read_text()).keys() == {"biden"}  # Biden's minute is kept

    monkeypatch.setattr(evaluate, "gallery_embedding", lambda files, *models: (computed.append(
        files[0].parent.name), real(files, *models))[1])
    people = evaluate.load_gallery(folder, analyzer, embedder)
    assert computed == ["biden", "obama"]  # the run after it computed only Obama
    assert people.keys() == {"biden", "obama"}
    assert np.linalg.norm(people["biden"] - people["obama"]) > 0.6
    for f in folder.glob("*/*"):
        os.utime(f, (f.stat().st_atime + 3600, f.stat().st_mtime + 3600))  # copied again, or the clock moved
    assert evaluate.load_gallery(folder, analyzer, embedder).keys() == people.keys()
    assert computed == ["biden", "obama"]  # the cache goes by the files' contents, not their times


def evaluate_clip(converted, source, faces, tmp_path, *extra):
    return evaluate.run(evaluate.parse_args([
        "--converted-path", str(converted), "--source-path", str(source), "--faces-a", str(faces[0] / "faces"),
        "--faces-b", str(faces[1] / "faces"), "--out-dir", str(tmp_path / "eval"), *extra]))


def test_source_against_itself(obama_faces, reagan_faces, gallery, tmp_path):
    """An unswapped video evaluated as 'converted': A retrieved among 3 people, no pose or landmark error,
    sharpness and flicker ratio 1."""
    frames = [f for _, f in zip(range(20), video.read_video(OBAMA))]
    clip = make_clip(tmp_path / "same.mp4", frames)
    result = evaluate_clip(clip, clip, (obama_faces, reagan_faces), tmp_path, "--gallery", str(gallery),
                           "--name-a", "obama", "--direction", "b2a")
    identity = result["identity"]
    assert identity["gallery"] == ["A", "B", "biden"]
    assert identity["top1_retrieval"] == 1.0 and identity["mean_rank_of_target"] == 1.0  # target A (b2a)
    assert identity["two_person_closer_to_A"] == 1.0
    assert identity["mean_distance_to_A"] < 0.6 < identity["mean_distance_to_B"]
    assert result["pose"]["error_deg"] == 0.0
    assert result["sharpness"]["ratio"] == 1.0 and result["sharpness"]["feature_scale_ratio"] == 1.0
    assert result["expression"]["landmark_error_over_inter_ocular"] == 0.0
    assert result["expression"]["mouth_correlation"] == 1.0
    assert result["flicker"]["ratio"] == 1.0
    saved = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert {k: v for k, v in saved.items() if k != "settings"} == result
    assert saved["settings"]["every"] == 1
    assert utils.read_image(tmp_path / "eval" / "contact_sheet.png").shape[0] == 320
    assert json.loads((gallery / ".embeddings.json").read_text()).keys() == {
        "obama", "biden"}  # cached for the next run


def test_blurred_copy_is_much_less_sharp(obama_faces, reagan_faces, tmp_path):
    frames = [f for _, f in zip(range(12), video.read_video(OBAMA))]
    (tmp_path / "src").mkdir()
    (tmp_path / "blur").mkdir()
    for i, f in enumerate(frames):
        utils.write_image(tmp_path / "src" / f"{i:03d}.png", f)
        utils.write_image(tmp_path / "blur" / f"{i:03d}.png", cv2.GaussianBlur(f, (0, 0), 1.0))
    result = evaluate_clip(tmp_path / "blur", tmp_path / "src", (obama_faces, reagan_faces), tmp_path)
    assert result["sharpness"]["ratio"] < 0.25
    assert result["sharpness"]["ratio"] < result["sharpness"]["feature_scale_ratio"] < 0.6  # features remain
    assert result["pose"]["error_deg"] < 2.0  # blur barely moves the landmarks


@pytest.mark.slow
def test_transfer_index_and_noise_control(obama_faces, reagan_faces, tiny_model, tmp_path):
    """A's own frames 'converted' to themselves are at transfer 0 exactly (still A); the noise control brings a
    blurred copy's fine detail back to the source's with noise, while its feature-scale figure stays low."""
    frames = [f for _, f in zip(range(6), video.read_video(OBAMA))]
    for name, change in (("src", lambda f: f), ("blur", lambda f: cv2.GaussianBlur(f, (0, 0), 1.5))):
        (tmp_path / name).mkdir()
        for i, f in enumerate(frames):
            utils.write_image(tmp_path / name / f"{i:03d}.png", change(f))
    held = ["--heldout-a", str(obama_faces / "faces"), "--heldout-b", str(reagan_faces / "faces"),
            "--model-dir", str(tiny_model)]
    same = evaluate_clip(tmp_path / "src", tmp_path / "src", (obama_faces, reagan_faces), tmp_path, *held)
    identity = same["identity"]
    assert identity["transfer_index"] == 0.0
    assert identity["heldout_B_distance_to_B"] < 0.45 < identity["mean_distance_source_to_B"]
    blurred = evaluate_clip(tmp_path / "blur", tmp_path / "src", (obama_faces, reagan_faces), tmp_path, *held,
                            "--noise-control")
    sharp, control = blurred["sharpness"], blurred["sharpness"]["noise_control"]
    assert sharp["ratio"] < 0.2 and 0.8 < control["ratio"] < 1.25  # noise up to the source's fine detail
    assert control["feature_scale_ratio"] < sharp["feature_scale_ratio"] + 0.1 < 0.7  # but no features
    assert abs(blurred["identity"]["transfer_index"]) < 0.2  # a blurred A is still A


def test_feature_scale_sharpness_is_not_fooled_by_a_noisy_blob():
    """A featureless face in the face's own colours with pixel noise (what an untrained model gives) scores
    above the real face on the Laplacian's fine detail, and near zero at the scale of the facial features;
    a face enlarged 4x from a quarter of the resolution keeps its features."""
    analyzer = faces.FaceAnalyzer()
    rng = np.random.default_rng(0)
    # a 256 px video frame and a 512 px photo (and a 512 px talking head, where ../shared is beside the checkout)
    for clip in [OBAMA, PHOTOS / "biden2.jpg"] + ([HILL] if HILL.exists() else []):
        frame = utils.read_image(clip) if clip.suffix == ".jpg" else next(iter(video.read_video(clip)))
        landmarks = analyzer.analyze(frame)[0][1]
        interior = align.face_interior_mask(landmarks, frame.shape)
        hull = cv2.GaussianBlur(align.face_hull_mask(landmarks, frame.shape[:2]), (0, 0), 3)[..., None]
        smooth = cv2.GaussianBlur(frame, (0, 0), align.inter_ocular(landmarks) / 6) + rng.normal(0, 6, frame.shape)
        blob = np.clip(frame * (1 - hull) + smooth * hull, 0, 255).astype(np.uint8)
        quarter = cv2.resize(cv2.resize(frame, None, fx=0.25, fy=0.25, interpolation=cv2.INTER_AREA),
                             frame.shape[1::-1], interpolation=cv2.INTER_CUBIC)

        def ratios(image):
            return (align.sharpness(image, landmarks, interior) / align.sharpness(frame, landmarks, interior),
                    evaluate.feature_sharpness(image, landmarks, interior) /
                    evaluate.feature_sharpness(frame, landmarks, interior))

        assert ratios(frame) == (1.0, 1.0)
        fine, features = ratios(blob)
        assert fine > 1.0 and features < 0.15, (clip.name, fine, features)
        fine, features = ratios(quarter)
        assert fine < 0.1 and features > 0.2, (clip.name, fine, features)


def test_another_gallery_person_is_retrieved(obama_faces, reagan_faces, gallery, tmp_path):
    """A photo of Biden that is not in the gallery (and its mirror image) 'converted' from itself retrieves Biden,
    not A or B."""
    photo = utils.read_image(PHOTOS / "biden.jpg")
    (tmp_path / "biden").mkdir()
    for i, f in enumerate((photo, np.ascontiguousarray(photo[:, ::-1]))):
        utils.write_image(tmp_path / "biden" / f"{i:03d}.png", f)
    result = evaluate_clip(tmp_path / "biden", tmp_path / "biden", (obama_faces, reagan_faces), tmp_path,
                           "--gallery", str(gallery))
    identity = result["identity"]
    assert identity["top1_retrieval"] == 0.0 and identity["most_retrieved_instead"] == "biden"
    assert identity["mean_rank_of_target"] > 1


def test_mouth_correlation_tells_a_mouth_of_its_own():
    """A swap whose mouth opens and closes with the source's correlates near 1; one that keeps its own rhythm
    (the same openings in another order) does not."""
    opening = np.abs(np.sin(np.linspace(0, 6, 30))) * 0.3
    rows = [dict(mouth=(o, 0.8 * o + 0.02)) for o in opening]
    assert evaluate.mouth_correlation(rows) == pytest.approx(1.0)
    shuffled = np.random.default_rng(0).permutation(opening)
    assert abs(evaluate.mouth_correlation([dict(mouth=(o, p)) for o, p in zip(opening, shuffled)])) < 0.5
    assert evaluate.mouth_correlation(rows[:2]) is None


def test_head_pose_of_a_mirrored_face():
    """Mirroring a photo flips yaw and roll, keeps pitch."""
    image = utils.read_image(PHOTOS / "obama2.jpg")
    analyzer = faces.FaceAnalyzer()
    (_, landmarks), = analyzer.analyze(image)
    (_, mirrored), = analyzer.analyze(np.ascontiguousarray(image[:, ::-1]))
    yaw, pitch, roll = align.head_pose(landmarks, image.shape)
    m_yaw, m_pitch, m_roll = align.head_pose(mirrored, image.shape)
    assert abs(yaw) > 10 and abs(yaw + m_yaw) < 3 and abs(roll + m_roll) < 3 and abs(pitch - m_pitch) < 3


def test_reconstruction_of_a_perfect_model():
    class Identity(torch.nn.Module):
        input_size = 64

        def forward(self, x, side):
            return x

    faces = np.random.default_rng(0).integers(0, 255, (3, 256, 256, 3), dtype=np.uint8)
    r = evaluate.reconstruction(Identity(), *evaluate.model_views(faces, None, 64), "a")
    assert r["l1"] == 0 and r["psnr"] == float("inf") and r["ssim"] == pytest.approx(1.0, abs=1e-4)
    assert r["ssim_face"] == pytest.approx(1.0, abs=1e-4)
    assert r["detail"] == pytest.approx(1.0) and r["detail_half"] == pytest.approx(1.0)
    assert r["contrast"] == pytest.approx(1.0)


def test_detail_in_the_models_view_reads_blur_and_the_swap(obama_faces):
    """A decoder that blurs what it draws has less of the real faces' detail, most of all at the model's own size;
    the swap (the other side's decoder) is measured on the same faces, without the figures that need a target."""
    class Blurring(torch.nn.Module):
        input_size, face_share = 64, align.FACE_COVERAGE  # the tutorial's crop

        def forward(self, x, side):  # side b blurs twice as wide as side a
            k = 3 if side == "a" else 5
            return torch.nn.functional.avg_pool2d(x, k, stride=1, padding=k // 2, count_include_pad=False)

    r = evaluate.reconstructions(Blurring(), [obama_faces / "faces"], None)
    assert set(r) == {"A->A", "A->B"} and r["A->A"]["faces"] == r["A->B"]["faces"] > 50
    assert "l1" in r["A->A"] and "l1" not in r["A->B"]
    for figures in r.values():
        assert 0 < figures["detail"] < figures["detail_half"] < 1
    assert r["A->B"]["detail"] < r["A->A"]["detail"] / 2 and r["A->A"]["detail"] < 0.5


def test_contrast_in_the_models_view_separates_a_flat_face_from_a_blurred_one(obama_faces):
    """A decoder that draws the face with less contrast loses detail by the same factor, which the contrast figure
    reads too (the conversion's colour transfer gives that contrast back); a blurring one loses detail, not
    contrast."""
    class Flattening(torch.nn.Module):
        input_size, face_share = 64, align.FACE_COVERAGE

        def forward(self, x, side):  # side a: 0.6 x the contrast around each face's mean; side b: a 5x5 blur
            if side == "a":
                mean = x.mean((2, 3), keepdim=True)
                return mean + 0.6 * (x - mean)
            return torch.nn.functional.avg_pool2d(x, 5, stride=1, padding=2, count_include_pad=False)

    r = evaluate.reconstructions(Flattening(), [obama_faces / "faces"], None)
    flat, blurred = r["A->A"], r["A->B"]
    assert flat["contrast"] == pytest.approx(0.36, rel=0.05) and flat["detail"] == pytest.approx(0.36, rel=0.1)
    assert flat["detail"] / flat["contrast"] == pytest.approx(1.0, abs=0.1)
    assert blurred["contrast"] > 0.6 and blurred["detail"] / blurred["contrast"] < 0.2, blurred


def test_ssim_inside_the_mask_ignores_the_outside():
    x = torch.rand(1, 3, 64, 64)
    y = x.clone()
    y[..., :, 40:] = torch.rand(1, 3, 64, 24)  # damage the right part only
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., :, :24] = 1
    assert float(tensors.ssim(x, y, mask=mask)) == pytest.approx(1.0, abs=1e-4)
    assert float(tensors.ssim(x, y)) < 0.8


def test_missing_inputs(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--converted-path", str(tmp_path / "x.mp4"), "--source-path", str(tmp_path / "y.mp4")])
    assert e.value.code == 1 and "converted video not found" in capsys.readouterr().err
