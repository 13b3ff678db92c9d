"""demo.py: all four steps end to end on the real default clips, with a tiny budget."""
import json

import pytest

from conftest import OBAMA, PHOTOS, REAGAN, ctrl_c_at_step

import convert_video
import demo
import models
import train
import utils
import video


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, capsys, monkeypatch):
    out = tmp_path / "demo"
    # a gallery of two people from the test photos: Obama (A, whose own faces stand for him) and Biden
    gallery = tmp_path / "gallery"
    for person, photo in (("obama", "obama.jpg"), ("biden", "biden2.jpg")):
        (gallery / person).mkdir(parents=True)
        (gallery / person / photo).symlink_to(PHOTOS / photo)
    flags = ["--video-a", str(OBAMA), "--video-b", str(REAGAN), "--out-dir", str(out), "--max-frames", "40",
             "--eval-every", "30", "--gallery", str(gallery)]
    # Ctrl-C while training: the checkpoint is saved and the demo stops there (exit 130), converting nothing
    real_step, real_convert = ctrl_c_at_step(monkeypatch, 3), convert_video.main
    monkeypatch.setattr(convert_video, "main", lambda *a: pytest.fail("converted after Ctrl-C"))
    assert demo.main(flags + ["--minutes", "1"]) == 130
    assert models.load_checkpoint(out / "model" / models.CHECKPOINT)["step"] == 2
    assert "run demo.py again" in capsys.readouterr().err and not (out / "swapped.mp4").exists()
    # run again: training goes on from the saved step, then the rest
    monkeypatch.setattr(train, "train_step", real_step)
    monkeypatch.setattr(convert_video, "main", real_convert)
    assert demo.main(flags + ["--minutes", "0.05"]) == 0
    assert models.load_checkpoint(out / "model" / models.CHECKPOINT)["step"] > 2
    printed = capsys.readouterr().out
    assert "resuming at step 2" in printed
    for path in ("model/checkpoint.pt", "model/preview.png", "model/loss.png", "swapped.mp4", "evaluation.json",
                 "contact_sheet.png"):
        assert (out / path).is_file(), path
        assert str(out / path.split("/")[0]) in printed
    assert len(utils.list_images(out / "personA")) == 40
    assert video.video_info(out / "swapped.mp4")["frames"] == video.video_info(OBAMA)["frames"]
    result = json.loads((out / "evaluation.json").read_text())
    assert set(result["reconstruction"]) == {"A->A", "A->B", "B->B", "B->A"}
    assert result["identity"]["gallery_size"] == 3 and "biden" in result["identity"]["gallery"]
    # the yardstick: Reagan's own held-out faces lie within the same-person distance of his reference
    assert 0.1 < result["identity"]["heldout_B_distance_to_B"] < 0.6
    # the held-out faces come from the clips' last 15 %, never from the training frames
    train_frames = {int(p.stem) for p in utils.list_images(out / "personA")}
    heldout_frames = {int(p.stem) for p in utils.list_images(out / "personA_heldout")}
    assert heldout_frames and min(heldout_frames) > max(train_frames)


def test_demo_missing_video(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        demo.main(["--video-a", str(tmp_path / "me.mp4"), "--out-dir", str(tmp_path / "o")])
    assert e.value.code == 1 and "video not found" in capsys.readouterr().err
