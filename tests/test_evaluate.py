"""evaluate.py's metrics on known cases, and a run on real frames."""
import json

import numpy as np
import pytest
import torch
from conftest import DATA, OBAMA, make_clip, need_data

import evaluate
import utils

IMAGES = DATA / "images" / "facerec"


def test_identical_images_zero_landmark_error_and_infinite_psnr():
    pts = np.random.default_rng(0).uniform(0, 100, (68, 2))
    assert evaluate.landmark_error(pts, pts) == 0.0
    assert evaluate.landmark_error(pts, pts + [3, 4]) == pytest.approx(5 / np.linalg.norm(pts[36] - pts[45]))
    img = np.random.default_rng(1).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    assert evaluate.psnr(img, img) == float("inf")
    assert evaluate.psnr(img, np.clip(img.astype(int) + 1, 0, 255).astype(np.uint8)) > 45
    x = torch.rand(2, 3, 32, 32)
    assert float(utils.ssim(x, x)) == pytest.approx(1.0, abs=1e-5)
    assert float(utils.ssim(x, torch.rand(2, 3, 32, 32))) < 0.2


def test_identity_distances_on_real_photos():
    need_data()
    analyzer, embedder = utils.FaceAnalyzer(), utils.FaceEmbedder()

    def embed(name):
        image = utils.read_image(IMAGES / name)
        (_, landmarks), = analyzer.analyze(image)
        return embedder.embed(image, landmarks)

    obama, obama2, biden = embed("obama.jpg"), embed("obama2.jpg"), embed("biden2.jpg")
    assert np.linalg.norm(obama - obama) < 1e-6
    assert np.linalg.norm(obama - obama2) < 0.6  # same person, other photo
    assert np.linalg.norm(obama - biden) > 0.6   # two different people


def test_source_against_itself(obama_faces, andrew_faces, tmp_path):
    """An unswapped video evaluated as 'converted': A's identity, no landmark error, flicker ratio 1."""
    frames = [f for _, f in zip(range(20), utils.read_video(OBAMA))]
    clip = make_clip(tmp_path / "same.mp4", frames)
    result = evaluate.run(evaluate.parse_args([
        "--converted-path", str(clip), "--source-path", str(clip), "--faces-a", str(obama_faces / "faces"),
        "--faces-b", str(andrew_faces / "faces"), "--out-dir", str(tmp_path / "eval")]))
    assert result["identity"]["id_retrieval_closer_to_B"] == 0.0
    assert result["identity"]["mean_distance_to_A"] < 0.6 < result["identity"]["mean_distance_to_B"]
    assert result["expression"]["landmark_error_over_inter_ocular"] == 0.0
    assert result["flicker"]["ratio"] == 1.0
    saved = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert {k: v for k, v in saved.items() if k != "settings"} == result
    assert saved["settings"]["every"] == 1
    assert utils.read_image(tmp_path / "eval" / "contact_sheet.png").shape[0] == 320


def test_reconstruction_of_a_perfect_model():
    class Identity(torch.nn.Module):
        input_size = 64

        def forward(self, x, side):
            return x

    faces = np.random.default_rng(0).integers(0, 255, (3, 256, 256, 3), dtype=np.uint8)
    r = evaluate.reconstruction(Identity(), faces, "a")
    assert r["l1"] == 0 and r["psnr"] == float("inf") and r["ssim"] == pytest.approx(1.0, abs=1e-4)


def test_missing_inputs(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--converted-path", str(tmp_path / "x.mp4"), "--source-path", str(tmp_path / "y.mp4")])
    assert e.value.code == 1 and "converted video not found" in capsys.readouterr().err
