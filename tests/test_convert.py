"""convert_video.py on real clips: frame count/fps/size kept, audio kept, untouched pixels, errors."""
import json

import av
import cv2
import numpy as np
import pytest
import torch

from conftest import OBAMA, make_clip, run_main

import align
import blend
import convert_video
import models
import records
import tensors
import utils
import video

GRAY = list(range(20, 25))  # frames with no face in the test clip


@pytest.fixture(scope="module")
def clip_with_audio(tmp_path_factory):
    """60 Obama frames (frames 20-24 replaced by a blank wall) and 2 s of audio."""
    frames = [f for _, f in zip(range(60), video.read_video(OBAMA))]
    for i in GRAY:
        frames[i] = np.full_like(frames[i], 90)
    return make_clip(tmp_path_factory.mktemp("clip") / "clip.mp4", frames, audio_seconds=2.0), frames


def run(argv, capsys):
    return run_main(convert_video.main, argv, capsys)


def first_frame_and_face(faces_fixture):
    """The first frame of a frames_and_faces fixture and its kept face's 68 landmarks (from alignments.json)."""
    record = json.loads((faces_fixture / "faces" / records.ALIGNMENTS_NAME).read_text())["frames"]["000000.png"]
    landmarks = np.array(next(r for r in record["faces"] if r["kept"] is True)["landmarks"], float)
    return utils.read_image(faces_fixture / "frames" / "000000.png"), landmarks


def test_video_keeps_format_audio_and_untouched_pixels(clip_with_audio, tiny_model, tmp_path, capsys):
    clip, frames = clip_with_audio
    out = tmp_path / "out.mp4"
    code, io = run(["--video-path", str(clip), "--model-dir", str(tiny_model), "--output-path", str(out)], capsys)
    assert code == 0, io.err
    src, dst = video.video_info(clip), video.video_info(out)
    assert (dst["frames"], dst["fps"], dst["width"], dst["height"]) == (60, 30.0, 256, 256)
    assert (src["frames"], src["width"]) == (60, 256)
    with av.open(str(out)) as c:
        assert [s.type for s in c.streams] == ["video", "audio"]
        assert c.streams.video[0].codec_context.name == "h264"
        assert "SYNTHETIC" in c.metadata.get("comment", "")
        audio_packets = sum(1 for p in c.demux(c.streams.audio[0]) if p.size)
    with av.open(str(clip)) as c:
        source_packets = sum(1 for p in c.demux(c.streams.audio[0]) if p.size)
    assert audio_packets == source_packets >= 31  # 2 s of AAC at 16 kHz, 1024 samples a packet
    converted = list(video.read_video(out))
    for i, (a, b) in enumerate(zip(frames, converted)):
        diff = np.abs(a.astype(int) - b)
        if i in GRAY:
            assert diff.mean() < 1.0, f"frame {i} without a face changed"
        else:
            assert diff[:20].mean() < 3.0 and diff[:, :15].mean() < 3.0  # far from the face: only codec noise
            assert diff[100:180, 80:176].mean() > 3.0  # the face itself was replaced
    assert "5 passed through" in io.out
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["frames_swapped"] == 55 and "SYNTHETIC" in sidecar["synthetic"]


def test_folder_mode_is_exact_outside_the_face(obama_faces, tiny_model, tmp_path, capsys):
    frames_dir = tmp_path / "frames"
    frames_dir.mkdir()
    names = sorted(p.name for p in (obama_faces / "frames").iterdir() if p.suffix == ".png")[:6]
    for n in names:
        utils.write_image(frames_dir / n, utils.read_image(obama_faces / "frames" / n))
    utils.write_image(frames_dir / "000999.png", np.full((256, 256, 3), 90, np.uint8))
    out = tmp_path / "out"
    code, io = run(["--video-path", str(frames_dir), "--model-dir", str(tiny_model), "--output-path", str(out),
                    "--workers", "1"], capsys)
    assert code == 0, io.err
    assert [p.name for p in utils.list_images(out)] == names + ["000999.png"]
    assert np.array_equal(utils.read_image(out / "000999.png"), utils.read_image(frames_dir / "000999.png"))
    a, b = utils.read_image(frames_dir / names[0]), utils.read_image(out / names[0])
    assert np.array_equal(a[:10], b[:10])  # top rows are far outside the face region
    assert np.abs(a.astype(int) - b).sum() > 0


def test_side_by_side_and_label(clip_with_audio, tiny_model, tmp_path, capsys):
    clip, frames = clip_with_audio
    out = tmp_path / "sbs.mp4"
    code, io = run(["--video-path", str(clip), "--model-dir", str(tiny_model), "--output-path", str(out),
                    "--side-by-side", "--label", "--max-frames", "10", "--start-frame", "15",
                    "--color", "avg", "--seamless"], capsys)
    assert code == 0, io.err
    info = video.video_info(out)
    assert (info["frames"], info["width"], info["height"], info["has_audio"]) == (10, 512, 256, False)
    first = next(video.read_video(out))
    assert np.abs(first[:, :256].astype(int) - frames[15]).mean() < 2.0  # left half: the original
    label = first[230:252, 258:330]  # bottom left of the right half: white text on a black box
    assert label.min() < 30 and label.max() > 200 and (label < 30).mean() > 0.5


def test_errors(clip_with_audio, tiny_model, tmp_path, capsys):
    clip, frames = clip_with_audio
    gray = make_clip(tmp_path / "gray.mp4", [np.full((64, 64, 3), 90, np.uint8)] * 5)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / models.CHECKPOINT).write_bytes(b"junk")
    existing = tmp_path / "exists.mp4"
    existing.write_bytes(b"keep me")
    cases = [
        (["--video-path", str(tmp_path / "nope.mp4")], "video not found"),
        (["--model-dir", str(tmp_path / "none")], "no checkpoint"),
        (["--model-dir", str(tmp_path / "bad")], "cannot read checkpoint"),
        (["--video-path", str(gray)], "no face found in any frame"),
        (["--output-path", str(existing)], "exists; pass --overwrite"),
        (["--output-path", str(tmp_path / "x.avi")], "must end in .mp4"),
    ]
    for extra, message in cases:
        argv = ["--video-path", str(clip), "--model-dir", str(tiny_model),
                "--output-path", str(tmp_path / "o.mp4"), "--workers", "1"] + extra
        code, io = run(argv, capsys)
        assert code == 1 and message in io.err and "Traceback" not in io.err, (extra, io.err)
        assert not (tmp_path / "o.mp4").exists()
    assert existing.read_bytes() == b"keep me"
    assert not list(tmp_path.glob(".*tmp*"))  # no half-written temp files left


def test_a_checkpoint_without_identities_swaps_the_largest_face(tiny_model, tmp_path, capsys):
    """Checkpoints made before identities were recorded (or without face landmarks) still convert."""
    ckpt = models.load_checkpoint(tiny_model / models.CHECKPOINT)
    ckpt["identities"] = None
    (tmp_path / "model").mkdir()
    models.save_checkpoint(tmp_path / "model", ckpt, is_best=False)
    args = convert_video.parse_args(["--model-dir", str(tmp_path / "model")])
    assert convert_video.person_to_swap(args, ckpt, "b") == (None, False)
    del ckpt["identities"]
    assert convert_video.person_to_swap(args, ckpt, "b") == (None, False)


def test_smoothing_follows_and_resets():
    base = np.random.default_rng(0).uniform(50, 150, (68, 2))
    moved = base + 1.0
    smoothed = convert_video.smooth_landmarks(base, moved, 0.5)
    assert np.allclose(smoothed, base + 0.5)
    jump = base + 80.0
    assert np.array_equal(convert_video.smooth_landmarks(base, jump, 0.5), jump)
    assert np.array_equal(convert_video.smooth_landmarks(None, moved, 0.5), moved)


def test_ctrl_c_leaves_no_output(clip_with_audio, tiny_model, tmp_path, capsys, monkeypatch):
    clip, _ = clip_with_audio

    def interrupt(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(blend, "paste_face", interrupt)
    code, io = run(["--video-path", str(clip), "--model-dir", str(tiny_model), "--output-path",
                    str(tmp_path / "o.mp4"), "--workers", "1"], capsys)
    assert code == 130 and io.err.strip().endswith("interrupted") and "Traceback" not in io.err
    assert list(tmp_path.iterdir()) == []  # neither the video nor a temp file


def test_video_writer_leaves_no_temp_file_when_it_cannot_start(tmp_path):
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video")
    with pytest.raises(av.FFmpegError):
        video.VideoWriter(tmp_path / "out.mp4", 30, 64, 64, audio_from=junk)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.mp4"]


def test_learned_mask_limits_what_is_pasted(obama_faces):
    """--mask: the model's own mask (a 4th output channel) cuts the pasted region; the hull alone ignores it."""
    frame, landmarks = first_frame_and_face(obama_faces)
    size = 128
    matrix = align.align_matrix(landmarks, size, coverage=1.0)
    face = np.full((size, size, 3), 255, np.uint8)  # a white face: every pasted pixel changes
    top_half = np.zeros((size, size), np.float32)
    top_half[:size // 2] = 1

    def changed(mask, face_mask):
        settings = blend.BlendSettings(color="none", mask=mask, mask_erode=convert_video.MASK_ERODE,
                                       mask_blur=convert_video.MASK_BLUR, brow_lift=1.0, seamless=False, sharpen=0,
                                       detail=0)
        out = blend.paste_face(frame, face, matrix, landmarks, settings, face_mask)
        return (out != frame).any(2)

    hull = changed("hull", None)
    assert hull.sum() > 2000
    assert np.array_equal(changed("hull", top_half), hull)  # the hull ignores the learned mask
    both = changed("both", top_half)
    assert 0.2 * hull.sum() < both.sum() < 0.8 * hull.sum() and not (both & ~hull).any()
    assert not both[int(landmarks[align.MOUTH][:, 1].max()) + 2:].any()  # nothing below the mouth is pasted
    assert not changed("learned", np.zeros((size, size), np.float32)).any()


def test_sharpen_auto_brings_back_detail_up_to_the_source_and_no_further(obama_faces):
    """--sharpen auto: a face drawn at 64 px and enlarged gains fine detail, up to the face it replaces; over a
    soft (blurred) video it adds nothing beyond that video's own detail. A bad amount is a one-line error."""
    sharp, landmarks = first_frame_and_face(obama_faces)

    def pasted(frame, sharpen):
        matrix = align.align_matrix(landmarks, 64)
        face = cv2.warpAffine(frame, matrix, (64, 64), flags=cv2.INTER_AREA)  # what a 64 px model draws at best
        settings = blend.BlendSettings(color="none", mask="hull", mask_erode=convert_video.MASK_ERODE,
                                       mask_blur=convert_video.MASK_BLUR, brow_lift=1.0, seamless=False,
                                       sharpen=sharpen, detail=0)
        return align.sharpness(blend.paste_face(frame, face, matrix, landmarks, settings), landmarks)

    source, soft, auto = align.sharpness(sharp, landmarks), pasted(sharp, 0), pasted(sharp, "auto")
    assert soft < 0.6 * source  # enlarging a 64 px face loses detail ...
    assert soft * 1.3 < auto <= source * 1.02  # ... auto gives much of it back, never more than the source has
    assert pasted(sharp, 1.5) > soft * 1.3  # a fixed amount sharpens too

    blurred = cv2.GaussianBlur(sharp, (0, 0), 2.0)
    # over a soft video it adds nothing: no more than that video's detail, or what pasting alone gives
    assert pasted(blurred, "auto") <= 1.02 * max(align.sharpness(blurred, landmarks), pasted(blurred, 0))

    for bad in ("-1", "lots"):
        with pytest.raises(SystemExit) as e:
            convert_video.parse_args(["--sharpen", bad])
        assert e.value.code == 2


@pytest.mark.slow
def test_detail_keeps_the_replaced_faces_texture_but_not_its_edges(obama_faces):
    """--detail: the band finer than the model's pixels comes from the face being replaced, limited in amplitude:
    its skin texture and grain carry over, the strong edges of its eyes and mouth (its features) do not."""
    frame, landmarks = first_frame_and_face(obama_faces)
    matrix = align.align_matrix(landmarks, 64)
    flat = np.full((64, 64, 3), 128, np.uint8)  # a face without detail: what detail the paste has is the source's
    inside = cv2.erode(align.face_hull_mask(landmarks, frame.shape), np.ones((15, 15))) > 0.5  # off the feather

    def band(image):
        return blend.fine_band(image.astype(np.float32), align.matrix_scale(matrix) ** -1)[inside]

    def pasted(detail):
        settings = blend.BlendSettings.from_args(convert_video.parse_args(
            ["--color", "none", "--mask", "hull", "--sharpen", "0", "--detail", str(detail)]))
        return band(blend.paste_face(frame, flat, matrix, landmarks, settings))

    source, none, once, twice = band(frame), pasted(0), pasted(1), pasted(2)
    assert none.std() < 0.3  # the flat face alone
    assert np.corrcoef(source, once)[0, 1] > 0.8  # the source's own texture, where it was
    assert np.median(np.abs(once)) > 0.5 * np.median(np.abs(source))  # at about its typical amplitude ...
    assert np.abs(once).max() < 0.1 * np.abs(source).max()  # ... but not its edges
    assert 1.7 < np.median(np.abs(twice)) / np.median(np.abs(once)) < 2.1  # the amount scales it
    with pytest.raises(SystemExit) as e:
        convert_video.parse_args(["--detail", "-0.5"])
    assert e.value.code == 2


def test_auto_precision_is_fp32_on_a_cpu_without_amx_and_the_swap_matches_bf16(obama_faces, monkeypatch):
    """bf16 autocast ran no faster than fp32 on CPUs without AMX (bench_convert.py and bench_train.py
    --precision); the faces it makes are the same to within bf16's rounding."""
    import torch

    cpu = torch.device("cpu")
    monkeypatch.setattr(utils, "cpu_has_amx", lambda: False)
    assert utils.pick_precision("auto", cpu) is None
    assert utils.pick_precision("bf16", cpu) == torch.bfloat16
    monkeypatch.setattr(utils, "cpu_has_amx", lambda: True)
    assert utils.pick_precision("auto", cpu) == (torch.bfloat16 if utils.cpu_supports_bf16() else None)
    torch.manual_seed(0)
    model = models.build_model(models.model_config("tiny")).eval().to(memory_format=torch.channels_last)
    faces = [utils.read_image(p) for p in utils.list_images(obama_faces / "faces")[:4]]
    x = tensors.to_tensor(np.stack([cv2.resize(f[48:208, 48:208], (64, 64)) for f in faces]))
    with torch.no_grad():
        fp32 = model(x.contiguous(memory_format=torch.channels_last), "b")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model(x.contiguous(memory_format=torch.channels_last), "b").float()
    assert (fp32 - bf16).abs().max() < 0.03


def test_coverage_swaps_the_chin_and_jaw_too(obama_faces):
    """A model trained with --coverage 0.8 sees (and so replaces) the upper chin and the jaw's sides, which the
    tutorial's crop (coverage 1) leaves to the person in the frame."""
    frame, landmarks = first_frame_and_face(obama_faces)
    lip, chin = landmarks[57], landmarks[8]
    below_lips = align.face_hull_mask(landmarks, frame.shape) > 0  # the face from 15 % to 35 % of the way lip -> chin
    below_lips[:int(lip[1] + 0.15 * (chin[1] - lip[1]))] = below_lips[int(lip[1] + 0.35 * (chin[1] - lip[1])):] = 0
    changed = {}
    for coverage in (1.0, 0.8):
        torch.manual_seed(0)
        model = models.build_model(dict(models.model_config("tiny"), coverage=coverage)).eval()
        assert model.face_share == pytest.approx(align.FACE_COVERAGE / coverage)
        settings = blend.BlendSettings(color="none", sharpen=0, detail=0)
        out = convert_video.swap_faces(model, [frame], [[landmarks]], "b", settings)[0]
        changed[coverage] = (out != frame).any(2)
    assert changed[1.0][below_lips].mean() < 0.2
    assert changed[0.8][below_lips].mean() > 0.8
    assert changed[0.8].sum() > 1.3 * changed[1.0].sum()


def test_pasted_hull_covers_the_forehead_but_not_the_temples(obama_faces):
    """The pasted region (the landmarks' hull, brows raised) reaches above the brows in the middle of the forehead, but
    not out past the brows' outer ends above them: there a model with the wider crop (coverage 0.8) draws B's hair,
    which pasted over A's temples was a dark stroke down the side of the face."""
    frame, landmarks = first_frame_and_face(obama_faces)
    hull = align.face_hull_mask(landmarks, frame.shape, blend.BlendSettings().brow_lift) > 0
    brows, eye_line = landmarks[align.BROWS], landmarks[align.EYES][:, 1].mean()
    middle = brows[[4, 5]].mean(0)  # the brows' inner ends
    assert hull[int(middle[1] - 0.8 * (eye_line - middle[1])), int(middle[0])]  # the lower forehead
    margin = 0.1 * align.inter_ocular(landmarks)
    (lx, ly), (rx, ry) = brows[0], brows[9]  # the outer ends
    assert not hull[:int(ly), :int(lx - margin)].any() and not hull[:int(ry), int(rx + margin):].any()


def test_the_swap_is_pasted_only_where_the_decoder_was_taught_to_draw(obama_faces):
    """A model's reach (where B's training faces were inside the loss's region, models.FaceSwapModel.reach) cuts
    the pasted hull by default (--mask both): A's jaw is left A's where B's decoder never learnt to draw; --mask hull
    ignores it, and a model without the record pastes the whole hull."""
    frame, landmarks = first_frame_and_face(obama_faces)
    torch.manual_seed(0)
    model = models.build_model(dict(models.model_config("tiny"), coverage=0.8)).eval()

    def changed(mask, side="b"):
        settings = blend.BlendSettings(color="none", mask=mask, sharpen=0, detail=0)
        return (convert_video.swap_faces(model, [frame], [[landmarks]], side, settings)[0] != frame).any(2)

    hull = changed("both")
    size = model.output_size
    upper = np.zeros((size, size), np.uint8)
    upper[:size * 5 // 8] = 255  # B's decoder taught above the mouth only
    model.reach = {"a": np.full((size, size), 255, np.uint8), "b": upper}
    assert np.array_equal(changed("hull"), hull)
    cut = changed("both")
    assert 0.3 * hull.sum() < cut.sum() < 0.9 * hull.sum() and not (cut & ~hull).any()
    assert not cut[int(landmarks[align.MOUTH][:, 1].max()) + 2:].any()  # the chin and the jaw's foot stay A's
    assert np.array_equal(changed("both", "a"), changed("hull", "a"))  # A's decoder: taught everywhere
