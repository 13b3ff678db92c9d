"""train.py: checkpoints, exact resume, Ctrl-C, NaN, bad input, and learning on real faces."""
import csv

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from conftest import OBAMA, ctrl_c_at_step, run_main

import align
import convert_video
import models
import train
import utils


def tiny_args(faces, model_dir, *extra):
    return ["--faces-a", str(faces[0]), "--faces-b", str(faces[1]), "--model-dir", str(model_dir),
            "--model", "tiny", "--batch-size", "4", "--precision", "fp32", "--workers", "0",
            "--preview-every", "1000", "--log-every", "1", "--no-warp-last", "0", *extra]


@pytest.fixture(scope="module")
def faces(obama_faces, reagan_faces):
    return obama_faces / "faces", reagan_faces / "faces"


def weights(model_dir, name=models.CHECKPOINT):
    return models.load_checkpoint(model_dir / name)["model"]


def test_checkpoint_round_trip_gives_identical_outputs(faces, tmp_path, monkeypatch):
    """The model train.py trained, in memory, gives the same outputs as models.load_model of its checkpoint."""
    trained = []
    real_prepare = train.prepare

    def keep(*args, **kwargs):
        state = real_prepare(*args, **kwargs)
        trained.append(state[0])
        return state

    monkeypatch.setattr(train, "prepare", keep)
    assert train.main(tiny_args(faces, tmp_path, "--iterations", "2")) == 0
    ckpt = models.load_checkpoint(tmp_path / models.CHECKPOINT)
    assert ckpt["step"] == 2 and ckpt["config"]["name"] == "tiny" and "optimizer" in ckpt
    reloaded, step = models.load_model(tmp_path / models.CHECKPOINT)
    model = trained[0].eval()
    assert step == 2
    assert all(torch.equal(v, reloaded.state_dict()[k]) for k, v in model.state_dict().items())
    reloaded.to(memory_format=torch.channels_last)  # as train.py runs it (other conv kernels otherwise)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x, "b"), reloaded(x, "b")) and torch.equal(model(x, "a"), reloaded(x, "a"))
    assert (tmp_path / "preview.png").exists() and utils.read_image(tmp_path / "preview.png").shape[0] > 6 * 64


def test_resume_continues_exactly(faces, tmp_path, monkeypatch):
    """2N steps in one go == N steps, stop, resume to 2N (same weights, fixed seed, CPU)."""
    train.main(tiny_args(faces, tmp_path / "once", "--iterations", "6", "--save-every", "3", "--workers", "1"))
    train.main(tiny_args(faces, tmp_path / "twice", "--iterations", "3", "--workers", "1"))
    # the people's identities come with the checkpoint: resuming does not measure them again
    monkeypatch.setattr(train, "person_identity", lambda *a: pytest.fail("identities measured again on resume"))
    train.main(tiny_args(faces, tmp_path / "twice", "--iterations", "6"))
    a, b = weights(tmp_path / "once"), weights(tmp_path / "twice")
    assert all(torch.equal(a[k], b[k]) for k in a)
    identities = [models.load_checkpoint(tmp_path / run / models.CHECKPOINT)["identities"] for run in ("once", "twice")]
    assert identities[0] == identities[1] and len(identities[0]["a"]) == len(identities[0]["b"]) == 128
    rows = list(csv.DictReader(open(tmp_path / "twice" / "log.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_adversarial_training_resumes_exactly(faces, tmp_path, monkeypatch):
    """--gan (on over the last half) and --likeness: the critics and their optimizer are in the checkpoint, and a run
    stopped before the adversarial end and resumed ends with the same weights, the critics' too; the log records the
    adversarial term and the critics' loss once they are on."""
    flags = ["--gan", "0.1", "--gan-last", "0.5", "--likeness", "0.05", "--iterations", "6"]
    assert train.main(tiny_args(faces, tmp_path / "once", *flags)) == 0
    ctrl_c_at_step(monkeypatch, 3)
    assert train.main(tiny_args(faces, tmp_path / "twice", *flags)) == 130
    monkeypatch.undo()
    assert models.load_checkpoint(tmp_path / "twice" / models.CHECKPOINT)["step"] == 2
    assert train.main(tiny_args(faces, tmp_path / "twice", *flags)) == 0
    once, twice = (models.load_checkpoint(tmp_path / run / models.CHECKPOINT) for run in ("once", "twice"))
    for part in ("model", "critics"):
        assert once[part].keys() == twice[part].keys()
        assert all(torch.equal(once[part][k], twice[part][k]) for k in once[part])
    assert once["critics_optimizer"]["state"]  # the critics learned (Adam has moments)
    untrained = models.build_critics(once["config"]).state_dict()
    assert not torch.equal(once["critics"]["faces_b.0.parametrizations.weight.original"],
                           untrained["faces_b.0.parametrizations.weight.original"])
    rows = list(csv.DictReader(open(tmp_path / "once" / "log.csv")))
    critics = [float(r["critics"]) for r in rows]
    assert all(np.isfinite(critics)) and critics[3] > critics[2] + 0.5  # the face critics join at step 4


@pytest.mark.slow
def test_no_gan_swaps_judges_the_reconstructions_only(faces, tmp_path, monkeypatch):
    """By default each person's critic judges that person's reconstructions and the other person's faces drawn by
    that person's decoder (twice as many made faces as real ones); --no-gan-swaps judges the reconstructions only."""
    judged = []
    real_step = train.Adversaries.critic_step

    def count(self, targets, masks, device, dtype):
        judged.append([(len(t), len(f)) for t, f in zip(targets, self.made[0])])
        return real_step(self, targets, masks, device, dtype)

    monkeypatch.setattr(train.Adversaries, "critic_step", count)
    flags = ["--gan", "0.1", "--gan-last", "1", "--iterations", "2"]
    assert train.main(tiny_args(faces, tmp_path / "swaps", *flags)) == 0
    assert judged == [[(4, 8), (4, 8)]] * 2
    judged.clear()
    assert train.main(tiny_args(faces, tmp_path / "own", *flags, "--no-gan-swaps")) == 0
    assert judged == [[(4, 4), (4, 4)]] * 2
    a, b = weights(tmp_path / "swaps"), weights(tmp_path / "own")
    assert not all(torch.equal(a[k], b[k]) for k in a)  # the swaps' term moved the weights


@pytest.mark.slow
def test_gan_switched_on_for_a_trained_model(faces, tmp_path):
    """A model trained without critics goes on with --gan: they are made then, and kept by a later plain run."""
    assert train.main(tiny_args(faces, tmp_path, "--iterations", "2")) == 0
    assert "critics" not in models.load_checkpoint(tmp_path / models.CHECKPOINT)
    assert train.main(tiny_args(faces, tmp_path, "--iterations", "4", "--gan", "0.1", "--gan-last", "1")) == 0
    critics = models.load_checkpoint(tmp_path / models.CHECKPOINT)["critics"]
    assert train.main(tiny_args(faces, tmp_path, "--iterations", "5")) == 0
    kept = models.load_checkpoint(tmp_path / models.CHECKPOINT)["critics"]
    assert all(torch.equal(critics[k], kept[k]) for k in critics)  # carried, untouched


@pytest.mark.slow
def test_lr_falls_to_lr_final_over_the_end_without_warp(faces, tmp_path, monkeypatch, capsys):
    """--lr-final: constant --lr while the warp is on, then linearly down to lr x lr-final at the last step; the
    same rates when the run is stopped in its end and resumed."""
    seen, stop_at = [], []
    real_step = train.train_step

    def record(net, optimizer, *args):
        seen.append(optimizer.param_groups[0]["lr"])
        if len(seen) in stop_at:
            raise KeyboardInterrupt  # Ctrl-C in the end without warp: saves 5 steps
        return real_step(net, optimizer, *args)

    monkeypatch.setattr(train, "train_step", record)
    flags = ["--warmup", "0", "--lr", "1e-3", "--lr-final", "0.1", "--no-warp-last", "0.5"]
    train.main(tiny_args(faces, tmp_path / "once", *flags, "--iterations", "8"))
    assert seen == pytest.approx([1e-3] * 4 + [1e-3 * (1 - 0.9 * k / 4) for k in (1, 2, 3, 4)])
    once, seen[:] = list(seen), []
    stop_at.append(6)
    train.main(tiny_args(faces, tmp_path / "twice", *flags, "--iterations", "8"))
    assert models.load_checkpoint(tmp_path / "twice" / models.CHECKPOINT)["step"] == 5
    stop_at.clear()
    train.main(tiny_args(faces, tmp_path / "twice", *flags, "--iterations", "8"))
    assert seen == once[:6] + once[5:]
    # with --minutes alone the end's length is its share of the steps made before it
    args = train.parse_args(["--no-warp-last", "0.2", "--lr-final", "0.5", "--iterations", "0", "--minutes", "3"])
    assert train.decay_tail(args, 80, 0) == (80, 100) and train.decay_tail(args, 130, 50) == (130, 150)
    assert train.decay_tail(train.parse_args(["--no-warp-last", "0.2"]), 80, 0) is None  # --lr-final 1: none
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--lr-final", "1.5"])
    assert e.value.code == 2 and "--lr-final: must be a number from 0 to 1" in capsys.readouterr().err


def test_already_done_is_a_no_op(faces, tmp_path, capsys):
    train.main(tiny_args(faces, tmp_path, "--iterations", "1"))
    before = (tmp_path / models.CHECKPOINT).read_bytes()
    assert train.main(tiny_args(faces, tmp_path, "--iterations", "1")) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert (tmp_path / models.CHECKPOINT).read_bytes() == before


def test_ctrl_c_saves(faces, tmp_path, monkeypatch):
    ctrl_c_at_step(monkeypatch, 4)
    # saved, and exit code 130 as for any Ctrl-C, so that what runs train.py next does not go on
    assert train.main(tiny_args(faces, tmp_path, "--iterations", "100", "--save-every", "50")) == 130
    assert models.load_checkpoint(tmp_path / models.CHECKPOINT)["step"] == 3


def test_nan_stops_and_keeps_last_good_checkpoint(faces, tmp_path, monkeypatch, capsys):
    real_step, calls = train.train_step, []

    def exploding(*args):
        calls.append(1)
        return (float("nan"), 0.1) if len(calls) == 5 else real_step(*args)

    monkeypatch.setattr(train, "train_step", exploding)
    with pytest.raises(SystemExit) as e:
        train.main(tiny_args(faces, tmp_path, "--iterations", "100", "--save-every", "2"))
    assert e.value.code == 1
    assert "NaN" in capsys.readouterr().err
    ckpt = models.load_checkpoint(tmp_path / models.CHECKPOINT)
    assert ckpt["step"] == 4
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_bad_inputs(faces, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    cases = [
        (["--faces-a", str(tmp_path / "nope")], "faces folder not found"),
        (["--faces-a", str(tmp_path / "empty")], "no face images"),
    ]
    for extra, message in cases:
        with pytest.raises(SystemExit) as e:
            train.main(tiny_args(faces, tmp_path / "m", *extra))
        err = capsys.readouterr().err
        assert e.value.code == 1 and message in err and "Traceback" not in err
    # flag values are checked by argparse (exit 2, the usual code for a usage error)
    for extra, message in ((["--batch-size", "0"], "--batch-size: must be 1 or more"),
                           (["--edges", "-1"], "--edges: must be a number >= 0"),
                           (["--edges", "5", "--loss", "l1"], "use it with --loss masked")):
        with pytest.raises(SystemExit) as e:
            train.main(tiny_args(faces, tmp_path / "m", *extra))
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and "Traceback" not in err
    # a corrupt checkpoint is reported, not overwritten
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / models.CHECKPOINT).write_bytes(b"garbage")
    with pytest.raises(SystemExit):
        train.main(tiny_args(faces, tmp_path / "bad", "--iterations", "1"))
    assert "cannot read checkpoint" in capsys.readouterr().err
    assert (tmp_path / "bad" / models.CHECKPOINT).read_bytes() == b"garbage"
    # so is an empty one (torch raised IndexError with a traceback)
    (tmp_path / "empty_ckpt").mkdir()
    (tmp_path / "empty_ckpt" / models.CHECKPOINT).write_bytes(b"")
    with pytest.raises(SystemExit) as e:
        train.main(tiny_args(faces, tmp_path / "empty_ckpt", "--iterations", "1"))
    err = capsys.readouterr().err
    assert e.value.code == 1 and "cannot read checkpoint" in err and "Traceback" not in err
    # another model preset on top of a checkpoint is refused
    train.main(tiny_args(faces, tmp_path / "m2", "--iterations", "1"))
    with pytest.raises(SystemExit):
        train.main(tiny_args(faces, tmp_path / "m2", "--model", "original"))
    assert "holds a 'tiny' model" in capsys.readouterr().err


def test_augmentation_pairs_match():
    """random_warp's target is the same face region as its input (the loss is meaningful)."""
    rng = np.random.default_rng(0)
    face = np.zeros((256, 256, 3), np.uint8)
    face[100:156, 100:156] = 255
    warped, target = train.random_warp(face, rng, 64)
    assert warped.shape == target.shape == (64, 64, 3)
    # the bright square lands near the centre of both
    for img in (warped, target):
        ys, xs = np.nonzero(img[..., 0] > 128)
        assert abs(ys.mean() - 32) < 4 and abs(xs.mean() - 32) < 4


def test_random_transform_folded_into_the_warp_is_the_warped_face(faces):
    """random_warp with random_transform's matrix samples the real face as the tutorial's two warps did
    (the face moved first, then warped), but in one interpolation: the same pixels within a grey level,
    and at least as sharp."""
    face = cv2.imread(str(sorted(faces[0].glob("*.png"))[0]))
    for seed in range(8):  # rotations, zooms, shifts, flips
        mat = train.random_transform(256, np.random.default_rng([seed, 0]))
        moved = cv2.warpAffine(face, mat[:2], (256, 256), borderMode=cv2.BORDER_REPLICATE)
        twice = train.random_warp(moved, np.random.default_rng([seed, 1]), 64)
        once = train.random_warp(face, np.random.default_rng([seed, 1]), 64, transform=mat)
        for a, b in zip(twice, once):
            assert np.abs(a.astype(float) - b).mean() < 1.5
            assert cv2.Laplacian(b, cv2.CV_64F).var() >= cv2.Laplacian(a, cv2.CV_64F).var()


def test_edge_term_costs_blur_not_brightness(faces):
    """--edges adds an L1 on the image gradients inside the face: on real faces it costs a blurred copy of the
    target, and nothing for a brightness shift of the same squared error, which keeps every edge; 0 is the
    masked loss as before."""
    loaded = train.load_training_faces([faces[1]], quiet=True)
    _, target, weights = train.make_batch(loaded, np.random.default_rng(0), 8, 64, warp=False)
    images = target.numpy().transpose(0, 2, 3, 1)
    blurred = torch.from_numpy(np.stack([cv2.GaussianBlur(t, (0, 0), 1.0) for t in images])).permute(0, 3, 1, 2)
    masked = weights > 0
    shift = ((blurred - target) ** 2 * masked).sum().div(masked.sum() * 3).sqrt()  # the same error inside the face
    brighter = target + shift
    plain, edges = train.reconstruction_loss("masked"), train.reconstruction_loss("masked", edges=10)
    assert edges(target, target, weights) == plain(target, target, weights)
    assert edges(brighter, target, weights) == pytest.approx(plain(brighter, target, weights).item(), abs=1e-6)
    assert edges(blurred, target, weights) - plain(blurred, target, weights) > 0.1
    assert train.parse_args([]).edges == 0 and train.EDGES == 0


def test_fixed_batch_loss_drops():
    torch.manual_seed(0)
    from models import build_model, model_config
    model = build_model(model_config("tiny"))
    opt = train.make_optimizer(model, 1e-4)
    x = torch.nn.functional.interpolate(torch.rand(4, 3, 4, 4), size=64, mode="bilinear")  # smooth images
    losses = []
    for _ in range(40):
        ya, yb = model.forward_both(x, x)
        loss = (ya - x).abs().mean() + (yb - x).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]


@pytest.mark.slow
def test_real_faces_300_steps_lower_both_losses(faces, tmp_path):
    """300 steps of the tiny model (bf16 where supported, L1 loss, warped throughout) on real Obama/Andrew faces."""
    assert train.main(["--faces-a", str(faces[0]), "--faces-b", str(faces[1]), "--model-dir", str(tmp_path),
                       "--model", "tiny", "--batch-size", "8", "--iterations", "300", "--log-every", "10",
                       "--lr", "2e-4", "--loss", "l1", "--warmup", "0", "--no-warp-last", "0",
                       "--workers", "1"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "log.csv")))
    first = [float(rows[0][k]) for k in ("loss_a", "loss_b")]
    last = np.mean([[float(r[k]) for k in ("loss_a", "loss_b")] for r in rows[-5:]], axis=0)
    assert (last < 0.7 * np.array(first)).all(), (first, last)
    assert (tmp_path / models.BEST_CHECKPOINT).exists()


@pytest.mark.slow
def test_pretrain_then_init_starts_a_new_pair_from_the_base(faces, tmp_path, capsys):
    """--pretrain pools both sides' faces for both decoders; --init copies those weights into a new run."""
    assert train.main(tiny_args(faces, tmp_path / "base", "--iterations", "2", "--pretrain")) == 0
    base = models.load_checkpoint(tmp_path / "base" / models.CHECKPOINT)
    # one step that moves nothing
    assert train.main(tiny_args(faces, tmp_path / "pair", "--iterations", "1", "--lr", "0",
                                "--init", str(tmp_path / "base" / models.CHECKPOINT))) == 0
    assert "starting from the weights of" in capsys.readouterr().out
    capsys.readouterr()
    code, io = run_main(train.main, tiny_args(faces, tmp_path / "other", "--iterations", "1", "--model", "original",
                                              "--init", str(tmp_path / "base" / models.CHECKPOINT)), capsys)
    assert code == 1 and "holds a 'tiny' model" in io.err and "Traceback" not in io.err
    code, io = run_main(train.main, tiny_args(faces, tmp_path / "other", "--iterations", "1", "--coverage", "0.8",
                                              "--init", str(tmp_path / "base" / models.CHECKPOINT)), capsys)
    assert code == 1 and "coverage 1.0 (here 0.8)" in io.err and "--coverage" in io.err, io.err
    pair = models.load_checkpoint(tmp_path / "pair" / models.CHECKPOINT)
    assert pair["step"] == 1 and all(torch.equal(base["model"][k], pair["model"][k]) for k in base["model"])


@pytest.mark.slow
def test_init_encoder_only_and_frozen_keeps_the_base_encoder(faces, tmp_path, capsys):
    """--init-parts encoder copies the base's encoder only (fresh decoders); --freeze-encoder keeps it while the
    decoders learn; freezing without a base is a one-line error."""
    assert train.main(tiny_args(faces, tmp_path / "base", "--iterations", "2", "--pretrain")) == 0
    base = models.load_checkpoint(tmp_path / "base" / models.CHECKPOINT)["model"]
    init = ["--init", str(tmp_path / "base" / models.CHECKPOINT), "--init-parts", "encoder"]
    assert train.main(tiny_args(faces, tmp_path / "free", "--iterations", "2", *init)) == 0
    assert train.main(tiny_args(faces, tmp_path / "frozen", "--iterations", "2", "--freeze-encoder", *init)) == 0
    assert "starting from the encoder of" in capsys.readouterr().out
    free, frozen = weights(tmp_path / "free"), weights(tmp_path / "frozen")
    for k in base:
        if k.startswith("encoder."):
            assert torch.equal(frozen[k], base[k]), k       # kept exactly
            assert not torch.equal(free[k], base[k]), k     # learned from the base's values
        else:
            assert not torch.equal(frozen[k], base[k]) and not torch.equal(free[k], base[k]), k
    torch.manual_seed(0)
    fresh = models.build_model(models.model_config("tiny")).state_dict()
    assert any(not torch.equal(frozen[k], fresh[k]) for k in fresh if k.startswith("decoder_b."))  # decoders learned
    code, io = run_main(train.main, tiny_args(faces, tmp_path / "nobase", "--iterations", "1", "--freeze-encoder"),
                        capsys)
    assert code == 1 and "--freeze-encoder" in io.err and "Traceback" not in io.err


@pytest.mark.slow
def test_detail_stage_learns_and_converts(faces, tmp_path, capsys):
    """--model tiny_detail: the detail stages learn from the real faces at 128 px (their last layer leaves zero,
    where it starts), resume from the checkpoint, and convert_video.py pastes their faces."""
    args = tiny_args(faces, tmp_path / "model", "--iterations", "3")
    args[args.index("tiny")] = "tiny_detail"
    assert train.main(args) == 0
    ckpt = models.load_checkpoint(tmp_path / "model" / models.CHECKPOINT)
    assert ckpt["config"]["detail_scale"] == 2
    for side in "ab":
        assert ckpt["model"][f"detail_{side}.to_rgb.weight"].abs().sum() > 0, side
    args[args.index("--iterations") + 1] = "4"
    assert train.main(args) == 0 and models.load_checkpoint(tmp_path / "model" / models.CHECKPOINT)["step"] == 4
    code, io = run_main(convert_video.main, ["--video-path", str(OBAMA), "--model-dir", str(tmp_path / "model"),
                                             "--output-path", str(tmp_path / "out.mp4"), "--max-frames", "3",
                                             "--workers", "1"], capsys)
    assert code == 0 and "3 frames (3 with a swapped face" in io.out, io.err


@pytest.mark.slow
def test_detail_stages_start_from_a_model_without_them(faces, tmp_path, capsys):
    """--init of a tiny model into tiny_detail copies every weight it has, and the new detail stages start as the
    plain enlargement; the other way round (stages the new model has no place for) is a one-line error."""
    assert train.main(tiny_args(faces, tmp_path / "plain", "--iterations", "2")) == 0
    plain = weights(tmp_path / "plain")
    args = tiny_args(faces, tmp_path / "detail", "--iterations", "1", "--lr", "0",  # one step that moves nothing
                     "--init", str(tmp_path / "plain" / models.CHECKPOINT))
    args[args.index("tiny")] = "tiny_detail"
    assert train.main(args) == 0
    assert "the detail stages start as the plain enlargement" in capsys.readouterr().out
    detail = weights(tmp_path / "detail")
    assert all(torch.equal(plain[k], detail[k]) for k in plain)
    assert {k.split(".")[0] for k in detail.keys() - plain.keys()} == {"detail_a", "detail_b"}
    model, _ = models.load_model(tmp_path / "detail" / models.CHECKPOINT)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        face = model(x, "b")
        assert torch.allclose(model.draw(x, "b"), nn.functional.interpolate(face, scale_factor=2, mode="bilinear"))
    code, io = run_main(train.main, tiny_args(faces, tmp_path / "back", "--iterations", "1",
                                              "--init", str(tmp_path / "detail" / models.CHECKPOINT)), capsys)
    assert code == 1 and "holds a 'tiny_detail' model with detail_scale 2 (here 1)" in io.err, io.err
    assert "Traceback" not in io.err


@pytest.mark.slow  # three training runs of a preset that is not the default: make test-all
def test_liae_layout_trains_and_resumes_exactly(faces, tmp_path):
    """--model tiny_liae: 2 + 2 steps == 4 in one go, its one decoder body stored alike under both names, A's inter
    layer learned, and the checkpoint rebuilds the model with models.py alone."""
    def args(folder, steps):
        a = tiny_args(faces, tmp_path / folder, "--iterations", str(steps))
        a[a.index("tiny")] = "tiny_liae"
        return a

    assert train.main(args("once", 4)) == 0
    assert train.main(args("twice", 2)) == 0 and train.main(args("twice", 4)) == 0
    once, twice = weights(tmp_path / "once"), weights(tmp_path / "twice")
    assert once.keys() == twice.keys() and all(torch.equal(once[k], twice[k]) for k in once)
    assert all(torch.equal(v, once[k.replace("decoder_a.", "decoder_b.")]) for k, v in once.items()
               if k.startswith("decoder_a."))
    torch.manual_seed(0)
    fresh = models.build_model(models.model_config("tiny_liae")).state_dict()
    assert not torch.equal(fresh["inter_a.0.weight"], once["inter_a.0.weight"])
    model, step = models.load_model(tmp_path / "once" / models.CHECKPOINT)
    assert step == 4 and model.decoder_a is model.decoder_b


@pytest.mark.slow
def test_coverage_trains_the_wider_square_and_stays_with_the_checkpoint(faces, tmp_path, capsys):
    """--coverage 0.8: the model learns the central 0.78 of the stored faces (its targets are that square, the
    features smaller in it), the checkpoint carries the value (convert_video.py and evaluate.py read it there),
    and a resume with another --coverage, or a value outside [FACE_COVERAGE, 1], is a one-line error."""
    loaded = train.load_training_faces([faces[1]], quiet=True)
    rng = [np.random.default_rng(3) for _ in range(2)]
    tight = train.make_batch(loaded, rng[0], 4, 64, warp=False)[1]
    wide = train.make_batch(loaded, rng[1], 4, 64, warp=False, share=align.FACE_COVERAGE / 0.8)[1]
    # the same faces and moves: the tight target is the wide one's centre, enlarged by 1 / 0.8
    centre = torch.nn.functional.interpolate(wide, size=80, mode="bilinear", align_corners=False)[..., 8:72, 8:72]
    assert (centre - tight).abs().mean() < 0.02 and (wide - tight).abs().mean() > 0.05
    model_dir = tmp_path / "m"
    assert train.main(tiny_args(faces, model_dir, "--iterations", "2", "--coverage", "0.8")) == 0
    model = models.load_model(model_dir / models.CHECKPOINT)[0]
    assert model.coverage == 0.8 and model.face_share == pytest.approx(0.78125)
    capsys.readouterr()
    for extra in ([], ["--coverage", "0.7"]):
        with pytest.raises(SystemExit) as e:
            train.main(tiny_args(faces, model_dir, "--iterations", "3", *extra))
        err = capsys.readouterr().err
        assert e.value.code == 1 and "trained with --coverage 0.8" in err and "Traceback" not in err
    assert train.main(tiny_args(faces, model_dir, "--iterations", "3", "--coverage", "0.8")) == 0
    with pytest.raises(SystemExit) as e:
        train.main(tiny_args(faces, tmp_path / "n", "--coverage", "0.5"))
    assert e.value.code == 2 and "--coverage: must be a number from 0.625 to 1" in capsys.readouterr().err


def test_checkpoint_records_where_each_decoder_was_taught_to_draw(faces, tmp_path):
    """The checkpoint carries each side's reach (train.region_reach): per pixel of the model's view, the share of that
    person's training faces whose loss region covers it. On real faces the tutorial's square (coverage 1) lies inside
    the region almost everywhere; the wider square of --coverage 0.8 reaches past it at the lower corners, beside the
    jaw, and there the reach ends (convert_video.py pastes no swap there). convert_video.py reads it back through
    models.load_model; a model without the record has no limit."""
    share = {}
    for coverage in ("1", "0.8"):
        model_dir = tmp_path / coverage
        assert train.main(tiny_args(faces, model_dir, "--iterations", "1", "--coverage", coverage)) == 0
        model = models.load_model(model_dir / models.CHECKPOINT)[0]
        loaded = train.load_training_faces([faces[1]], quiet=True)
        assert np.array_equal(model.reach["b"], train.region_reach(loaded, 64, model.face_share))
        for side in "ab":
            r, mask = model.reach[side], model.reach_mask(side)
            assert r.shape == (64, 64) and r.dtype == np.uint8 and r[8:48, 16:48].min() == 255  # brows to mouth
            assert mask.dtype == np.float32 and set(np.unique(mask)) <= {0.0, 1.0}
        share[coverage] = mask.mean()
        corners = r[-4:, :4], r[-4:, -4:]
    assert share["1"] > 0.97 and 0.8 < share["0.8"] < 0.97
    assert all(c.max() < 255 * models.REACH_MIN for c in corners)  # at 0.8: beside the jaw's foot
    assert models.build_model(models.model_config("tiny")).reach_mask("b") is None
