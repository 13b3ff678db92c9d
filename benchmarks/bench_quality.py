"""The time-to-quality curve: train a recipe for fixed CPU budgets, swap held-out frames, measure the swap.

For each pair of people (clips of ../shared/data) the last HOLDOUT of every clip is held out; faces of
the rest are extracted, a recipe (model preset, loss, training flags) is trained once, and at every
budget (minutes of this machine's time, e.g. 5 15 30 60) the model converts A's held-out frames and
evaluate.py measures the swap: identity retrieval among a gallery of every person in ../shared/data,
sharpness, pose, landmark error, flicker, held-out reconstruction. One JSON and one contact sheet per
budget, a summary JSON and a Markdown table of the whole run.

Budgets are turned into step counts with each recipe's throughput (samples/s) measured at the start of
the run on this machine, so the curve is what an idle machine of this kind gives in those minutes and
does not depend on what else runs while the benchmark trains. Recipes with --no-warp-last train a trunk
with the random warp and, for each budget, a branch that ends without it (as a run of that length would).
Recipes that differ only in flags acting in that end (TAIL_FLAGS, e.g. --lr-final) share their speed and
their trunk (kept at each budget's step in <out>/<pair>/trunks/), so each of them trains only its ends; a
budget below one trained before goes on from the furthest kept trunk below it. Recipes that differ only in the
length of their end (--no-warp-last) share their trunk too.
A recipe with --after RECIPE:MINUTES is a run trained in parts: each budget goes on from RECIPE's model at MINUTES
(--init) for the minutes left, at its own speed.

    python benchmarks/bench_quality.py --pairs obama-andrew mead hdtf --recipes tiny_masked_base default tutorial \\
        --budgets 5 15 30 60 --out bench_out/quality
    python benchmarks/bench_quality.py --pairs obama-andrew --recipes "try:--model lite128 --loss l1" --budgets 5
"""
import argparse
import hashlib
import json
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

import tutorial
from common import ROOT, VIDEOS, log_rate, require_data

import align
import blend
import convert_video
import crop_face
import crop_from_video
import demo
import evaluate
import faces
import models
import train
import utils

EMOTIONS = ("angry", "contempt", "disgusted", "fear", "happy", "sad")
PAIRS = {  # A's clips, B's clips, A's and B's names in the gallery
    "obama-andrew": (["styletalk_obama_clip1.mp4"], ["styletalk_andrew_clip1.mp4"], "obama", "andrew_ng"),
    "mead": ([f"dreamtalk_mead_M030_front_{e}_level3_001.mp4" for e in EMOTIONS],
             [f"dreamtalk_mead_W011_front_{e}_level3_001.mp4" for e in EMOTIONS], "mead_m030", "mead_w011"),
    "hdtf": (["sadtalker_WDA_AlexandriaOcasioCortez_000.mp4"], ["sadtalker_WDA_KatieHill_000.mp4"],
             "ocasio_cortez", "katie_hill"),
}
TINY_MASKED = "--model tiny --loss masked --batch-size 16 --lr 2e-4 --warmup 100 --no-warp-last 0.2"
TINY128 = TINY_MASKED.replace("--model tiny", "--model tiny128")  # 128 px out of tiny's encoder, the same recipe
TINY128_LR5 = TINY128.replace("--lr 2e-4", "--lr 5e-4")  # the same at 2.5x the learning rate
TINY128_LR5_B8 = TINY128_LR5.replace("--batch-size 16", "--batch-size 8")  # and half the batch
TINY128_LR5_B4 = TINY128_LR5.replace("--batch-size 16", "--batch-size 4")  # and a quarter
TINY128_LR5_B8_NOWARP40 = TINY128_LR5_B8.replace("--no-warp-last 0.2", "--no-warp-last 0.4")  # batch 8, 40 % unwarped
TINY128_LR5_B8_NOWARP60 = TINY128_LR5_B8.replace("--no-warp-last 0.2", "--no-warp-last 0.6")  # and 60 %
TINY128_LR5_B8_NOWARP80 = TINY128_LR5_B8.replace("--no-warp-last 0.2", "--no-warp-last 0.8")  # and 80 %
# an adversarial hour from a kept model: each decoder's reconstructions judged over the whole of the run
TINY128_B8_GAN_HOUR = f"{TINY128_LR5_B8} --coverage 0.8 --gan 0.1 --no-gan-swaps --gan-last 1"
TINY_DETAIL = TINY_MASKED.replace("--model tiny", "--model tiny_detail")  # tiny with a detail stage per person
TINY128_DETAIL_LR5_B8 = TINY128_LR5_B8.replace("tiny128", "tiny128_detail")  # batch 8 with 128 px faces redrawn at 256
FROM_BASE = f"--init {ROOT / 'base' / 'tiny_base.pt'}"  # make it first: benchmarks/make_base.py --model tiny
RECIPES = {  # train.py flags (batch size given, so budgets can be turned into steps)
    # train.py's default: the tiny model (64 px) with the masked loss, warm-up, no warp at the end
    "tiny_masked": TINY_MASKED,
    # the same with another seed (weights and batches): how much two runs of one recipe differ
    "tiny_masked_seed1": f"{TINY_MASKED} --seed 1",
    # the same from a base (it leaves out the benchmark's people)
    "tiny_masked_base": f"{TINY_MASKED} {FROM_BASE}",
    # the base's encoder only, new decoders (faceswap's way): they learn only A's and B's faces
    "tiny_masked_encoder": f"{TINY_MASKED} {FROM_BASE} --init-parts encoder",
    # the same with the encoder kept fixed: only the decoders learn, a cheaper step
    "tiny_masked_frozen": f"{TINY_MASKED} {FROM_BASE} --init-parts encoder --freeze-encoder",
    # the default with the learning rate falling to a tenth over the end without warp (shares its trunk)
    "tiny_masked_decay": f"{TINY_MASKED} --lr-final 0.1",
    # the default with an L1 on the image gradients inside the face (the gradient difference loss), two weights
    "tiny_edges5": f"{TINY_MASKED} --edges 5",
    "tiny_edges15": f"{TINY_MASKED} --edges 15",
    # the default with a wider crop: the face's features fill 0.8 of the model's square, so the chin, jaw and cheeks
    # are drawn as B's too (the same compute per face as the default)
    "tiny_cover80": f"{TINY_MASKED} --coverage 0.8",
    # tiny's encoder with decoders twice as wide
    "tiny_wide": TINY_MASKED.replace("--model tiny", "--model tiny_wide"),
    # tiny in DeepFaceLab's LIAE layout (one decoder body behind a shared and an own inter layer), the same recipe
    "tiny_liae": TINY_MASKED.replace("--model tiny", "--model tiny_liae"),
    # 128 px out of tiny's encoder (the face averaged down to 64 px for it), the default's recipe
    "tiny128": TINY128,
    # tiny128 with the wider crop: what the ceiling says can hold more likeness and more detail than 64 px at 1
    "tiny128_cover80": f"{TINY128} --coverage 0.8",
    "tiny128_cover80_seed1": f"{TINY128} --coverage 0.8 --seed 1",
    # the same with a learning rate 2.5x the default's: do the 128 px decoders, far from settled at 15 minutes, learn
    # faster per step?
    "tiny128_cover80_lr5": f"{TINY128_LR5} --coverage 0.8",
    "tiny128_cover80_lr5_seed1": f"{TINY128_LR5} --coverage 0.8 --seed 1",
    # more learning per CPU minute still: twice the rate again (it diverges), or twice the steps of half the batch
    "tiny128_cover80_lr10": f"{TINY128.replace('--lr 2e-4', '--lr 1e-3')} --coverage 0.8",
    "tiny128_cover80_lr5_b8": f"{TINY128_LR5_B8} --coverage 0.8",
    # half batch 8's batch again: twice its updates per face (at 0.86x its speed per face on 2 cores, docs/QUALITY.md).
    # Does the faster start go on?
    "tiny128_cover80_lr5_b4": f"{TINY128_LR5_B4} --coverage 0.8",
    # batch 8 with the edge term (the gradient difference loss, --edges 5), measured before only on tiny's 64 px faces
    # with the conversion's texture and sharpening on: does it make the 128 px decoders draw finer strokes?
    "tiny128_cover80_lr5_b8_edges5": f"{TINY128_LR5_B8} --coverage 0.8 --edges 5",
    # batch 8 with twice its end without warp (the last 40 % of the steps, not 20 %): DeepFaceLab's advice is to turn
    # the random warp off once the model has settled, for sharper faces. Given batch 8's speed (the warp is made in
    # the batch-making process, so a step without it costs the training process the same)
    "tiny128_cover80_lr5_b8_nowarp40": f"{TINY128_LR5_B8_NOWARP40} --coverage 0.8",
    # and the last 60 %: does the detail go on growing with the share, or does the swap drift back towards A once
    # the warp has shaped less of the run?
    "tiny128_cover80_lr5_b8_nowarp60": f"{TINY128_LR5_B8_NOWARP60} --coverage 0.8",
    "tiny128_cover80_lr5_b8_nowarp80": f"{TINY128_LR5_B8_NOWARP80} --coverage 0.8",
    # the two with another seed (weights and batches): how much two runs of each differ
    "tiny128_cover80_lr5_b8_seed1": f"{TINY128_LR5_B8} --coverage 0.8 --seed 1",
    "tiny128_cover80_lr5_b8_nowarp40_seed1": f"{TINY128_LR5_B8_NOWARP40} --coverage 0.8 --seed 1",
    # the same with the learning rate falling to a tenth over its end without warp (it shares the trunk): is the
    # detail that stops growing after 60 minutes held back by the noise of batch 8's steps at a constant rate?
    "tiny128_cover80_lr5_b8_decay": f"{TINY128_LR5_B8} --coverage 0.8 --lr-final 0.1",
    # the same with twice the decoders' channels at 64 and 128 px (tiny128_fine), where the finest detail is drawn
    "tiny128_fine_cover80_lr5_b8": f"{TINY128_LR5_B8.replace('tiny128', 'tiny128_fine')} --coverage 0.8",
    # the same with the encoder reading the face at 128 px (tiny128_enc128), and with a code of 512 numbers: is the
    # detail held back by what the code can see, or by how much it can say?
    "tiny128_enc128_cover80_lr5_b8": f"{TINY128_LR5_B8.replace('tiny128', 'tiny128_enc128')} --coverage 0.8",
    "tiny128_enc128_code512_cover80_lr5_b8":
        f"{TINY128_LR5_B8.replace('tiny128', 'tiny128_enc128_code512')} --coverage 0.8",
    # the same with an adversarial end: a patch discriminator per person judging the 128 px faces (and the swaps)
    # over the last half, where the pixel loss has settled
    "tiny128_cover80_lr5_b8_gan": f"{TINY128_LR5_B8} --coverage 0.8 --gan 0.1",
    # the discriminators judging each decoder's own reconstructions only, not the swaps (DeepFaceLab's way)
    "tiny128_cover80_lr5_b8_gan_recon": f"{TINY128_LR5_B8} --coverage 0.8 --gan 0.1 --no-gan-swaps",
    # batch 8's 60-minute model trained on with the adversarial end judging reconstructions only, over the whole of
    # the budget's later part (its last 20 % without warp): does detail keep growing from a settled model?
    "tiny128_cover80_lr5_b8_then_gan_recon": f"{TINY128_B8_GAN_HOUR} --after tiny128_cover80_lr5_b8:60",
    # the same adversarial hour from the 60-minute model of the end without warp over 80 % of the run
    "tiny128_cover80_lr5_b8_nowarp80_then_gan_recon":
        f"{TINY128_B8_GAN_HOUR} --after tiny128_cover80_lr5_b8_nowarp80:60",
    # the same 60-minute model trained on for the budget's later part as tiny128_detail: a detail stage per person
    # learns to redraw its decoder's 128 px faces at 256 px from that person's real faces (the decoders go on
    # learning as before): does a person's own detail at twice the size reach the swap?
    "tiny128_cover80_lr5_b8_nowarp80_then_detail":
        f"{TINY128_DETAIL_LR5_B8} --coverage 0.8 --after tiny128_cover80_lr5_b8_nowarp80:60",
    # the default recipe at the same higher rate: is the gain the 128 px decoders' alone?
    "tiny_masked_lr5": TINY_MASKED.replace("--lr 2e-4", "--lr 5e-4"),
    # tiny128 with the edge term
    "tiny128_edges5": f"{TINY128} --edges 5",
    # the default with an adversarial end: each person's faces judged by a patch discriminator over the last half
    "tiny_gan": f"{TINY_MASKED} --gan 0.1",
    # the default with a code discriminator making A's and B's codes alike (the whole run)
    "tiny_likeness": f"{TINY_MASKED} --likeness 0.05",
    "tiny_likeness02": f"{TINY_MASKED} --likeness 0.2",
    # the default with a detail stage per person: 64 px faces redrawn at 128 px from that person's real faces
    "tiny_detail": TINY_DETAIL,
    # with the code discriminator, and with an adversarial end judging the detail stages' 128 px faces
    "tiny_detail_likeness": f"{TINY_DETAIL} --likeness 0.05",
    "tiny_detail_likeness_gan": f"{TINY_DETAIL} --likeness 0.05 --gan 0.1",
    # 128 px faces with the adversarial end
    "tiny128_gan": f"{TINY128} --gan 0.1",
    # the 128 px preset with the same recipe (5x the compute per sample)
    "lite128": "--model lite128 --loss masked --batch-size 16 --lr 2e-4 --warmup 100 --no-warp-last 0.2",
    # the default before them (demo.py on a CPU): the tiny model, L1
    "default": "--model tiny --loss l1 --batch-size 16 --lr 1e-4",
    # the tutorial's recipe exactly: original model, L1, its two Adam optimizers, fp32, batch 64
    "tutorial": "tutorial",
}
# train.py flags that act only in the end without warp: recipes that differ only in them share one speed and one
# trunk, and each trains only its own end
TAIL_FLAGS = ("--lr-final",)
# train.py flags giving the share of a run at its end that differs from the rest (no random warp, the adversarial
# loss): a budget's run is a trunk without any end, kept and gone on from by the next budget, and a branch that ends
END_FLAGS = {"--no-warp-last": 0.0, "--gan-last": train.GAN_LAST}
NO_END = {name: 0 for name in END_FLAGS}
# a bench flag, not train.py's: "--after RECIPE:MINUTES" trains each budget on from RECIPE's model at MINUTES (kept in
# <pair>/RECIPE/<MINUTES>min/model, weights only, as --init), for the budget's minutes beyond MINUTES at this
# recipe's own speed: a run trained in parts, its second part with other flags
AFTER = "--after"
TRUNK_FILES = (models.CHECKPOINT, "log.csv")  # what a kept trunk needs to go on from (60 MB for tiny)
HOLDOUT = 0.15
CALIBRATE_GUESS = 20  # steps of the first guess of a recipe's speed: two log rows (train_flags logs every 10)
TUTORIAL_SAVE_EVERY = 40  # the tutorial's steps between saves of its trunk (~8 minutes here)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    p.add_argument("--recipes", nargs="+", default=list(RECIPES),
                   help="names of RECIPES, or 'name:train.py flags' for a recipe of your own")
    p.add_argument("--budgets", type=float, nargs="+", default=[5, 15, 30, 60], help="minutes of training")
    p.add_argument("--out", type=Path, default=Path("bench_out/quality"))
    p.add_argument("--calibrate-seconds", type=float, default=60, help="time spent measuring each recipe's speed")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads for training (0 = all cores); the speed is always measured with all cores")
    p.add_argument("--eval-every", type=int, default=2, help="evaluate every Nth held-out frame")
    p.add_argument("--sheet", type=Path, default=None,
                   help="only gather the first frame of each budget's sheet.jpg for --pairs, --recipes and --budgets "
                        "into one picture: a row per pair and budget; the source, then each recipe's raw and default "
                        "faces")
    p.add_argument("--ceiling", action="store_true",
                   help="only measure what a perfect model could reach: each pair's held-out A frames with their own "
                        "face cut out at the model's size (CEILING_SIZES) and pasted back as convert_video.py pastes "
                        "(detail), and with B's held-out faces pasted over them (likeness), at each --coverage of "
                        "CEILING_COVERAGES")
    p.add_argument("--calibrate-only", action="store_true",
                   help="only measure the recipes' speed (do it on an idle machine; later runs reuse it)")
    p.add_argument("--stage", choices=["all", "train", "evaluate"], default="all",
                   help="train: only train, keeping each budget's model in <budget>min/model (e.g. on a GPU "
                        "machine, with the faces and rates.json of a run here); evaluate: only evaluate those "
                        "models; all: both")
    p.add_argument("--device", default="cpu",
                   help="where to train (cpu, cuda, ...); budgets stay minutes of this CPU, from rates.json")
    p.add_argument("--workers", type=int, default=1, help="train.py's batch-making processes")
    p.add_argument("--precision", choices=utils.PRECISIONS, default="auto",
                   help="train.py's --precision (auto: bf16 on a GPU or an AMX CPU, else fp32); fp32 on an AMX CPU "
                        "trains as a CPU without AMX does, to compare with figures measured there")
    p.add_argument("--convert-flags", default="",
                   help="convert_video.py flags for the swap (e.g. '--sharpen 0'); the results go to "
                        "<budget>min_<flags>/ and the summary names the recipe with them")
    return p.parse_args(argv)


def recipe_flags(spec):
    name, _, flags = spec.partition(":")
    flags = flags or RECIPES.get(name)
    if flags is None:
        raise SystemExit(f"unknown recipe {name!r}: use one of {', '.join(RECIPES)} or name:flags")
    return name, flags.split() if flags != "tutorial" else "tutorial"


def flag(flags, name, default):
    return type(default)(flags[flags.index(name) + 1]) if name in flags else default


# ---------------------------------------------------------------- data


def check(returncode):
    """Stop the benchmark when a step it runs fails (the step has printed why)."""
    if returncode:
        raise SystemExit(returncode)


def prepare_pair(pair, out):
    """Frames and faces of every clip, split into training and held-out parts; A's held-out frames in one folder.

    Without the clips (a GPU machine given only the faces of a run here) the faces already in `out` are used. Two
    runs on one pair and `out` take turns: the second waits for the first to finish preparing, then finds it done."""
    root = out / pair / "data"
    root.mkdir(parents=True, exist_ok=True)
    with utils.locked(root, wait=True):
        return prepare_pair_now(pair, root)


def prepare_pair_now(pair, root):
    clips_a, clips_b, _, _ = PAIRS[pair]
    sides = {}
    for side, clips in (("A", clips_a), ("B", clips_b)):
        bases = [root / side / Path(clip).stem for clip in clips]
        sides[side] = ([b / "train_face" for b in bases], [b / "heldout_face" for b in bases])
        if not VIDEOS.is_dir():
            continue
        for clip, base in zip(clips, bases):
            video = VIDEOS / clip
            split = demo.split_seconds(video, HOLDOUT)
            for part, extra in (("train", ["--end", f"{split:.3f}"]), ("heldout", ["--start", f"{split:.3f}"])):
                check(crop_from_video.main(["--video-path", str(video), "--save-dir", str(base / part)] + extra))
                check(crop_face.main(["--images-dir", str(base / part), "--faces-dir", str(base / f"{part}_face")]))
    test_frames = root / "A_test_frames"  # A's held-out frames of every clip, in clip order
    if VIDEOS.is_dir() and not test_frames.is_dir():
        tmp = test_frames.with_name(test_frames.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for k, clip in enumerate(clips_a):
            for frame in utils.list_images(root / "A" / Path(clip).stem / "heldout"):
                shutil.copy(frame, tmp / f"{k:02d}_{frame.name}")
        tmp.rename(test_frames)
    return sides, test_frames


# ---------------------------------------------------------------- training


def train_flags(flags, faces, model_dir, iterations, end=None, device="cpu", workers=1, precision="auto"):
    """train.py's flags for a recipe; end: {flag: share} overriding the shares of the run's end phases."""
    extra = list(flags) + ["--device", device, "--workers", str(workers)]
    if precision != "auto":  # else the recipe's own, or train.py's default
        extra = strip(extra, "--precision") + ["--precision", precision]
    for name, share in (end or {}).items():
        extra = strip(extra, name) + [name, str(share)]
    return (["--faces-a", *map(str, faces["A"][0]), "--faces-b", *map(str, faces["B"][0]),
             "--model-dir", str(model_dir), "--iterations", str(iterations), "--save-every", "1000000",
             "--preview-every", "1000000", "--log-every", "10"] + extra)


def strip(flags, name):
    if name not in flags:
        return flags
    i = flags.index(name)
    return flags[:i] + flags[i + 2:]


def trunk_flags(flags):
    """A recipe's flags without those that act only in its end without warp (TAIL_FLAGS)."""
    if flags == "tutorial":
        return flags
    for name in TAIL_FLAGS:
        flags = strip(flags, name)
    return flags


def speed_flags(flags):
    """A recipe's flags without those that do not change its speed: its end's (TAIL_FLAGS), its seed and its learning
    rate."""
    return strip(strip(trunk_flags(flags), "--seed"), "--lr")


def shared_trunk(pair_dir, flags, step):
    """Where the trunk of every recipe with these trunk flags is kept at `step`: one recipe trains it, the others
    start their ends from a copy. The shares of the end (END_FLAGS) do not count: a trunk trains without its end."""
    flags = trunk_flags(flags)
    if flags != "tutorial":
        for name in END_FLAGS:
            flags = strip(flags, name)
    key = hashlib.sha1(" ".join(flags).encode()).hexdigest()[:12]
    return pair_dir / "trunks" / key / str(step)


def train_trunk(flags, faces, trunk, start, pair_dir, **on):
    """Bring this recipe's trunk (with the warp) to step `start`: from the furthest kept copy at or below it (one is
    kept at the start of every budget's end that a recipe with the same trunk flags trained) where that is nearer
    than the trunk itself, or where the trunk is past `start` (a budget below one trained before), else by training
    on; a copy of the result is kept."""
    kept = shared_trunk(pair_dir, flags, start)
    path = trunk / models.CHECKPOINT
    at = models.load_checkpoint(path)["step"] if path.is_file() else 0
    copies = [int(p.name) for p in kept.parent.glob("*") if p.name.isdigit()] if kept.parent.is_dir() else []
    nearest = max((step for step in copies if step <= start), default=0)
    if at > start and at not in copies:
        raise SystemExit(f"{path} is at step {at}, past this budget's {start}, and no copy of it is kept in "
                         f"{kept.parent}: move {trunk} away to train this budget")
    if nearest > at or at > start:  # (a trunk past start is kept at its step: the check above)
        shutil.rmtree(trunk, ignore_errors=True)
        if nearest:
            shutil.copytree(kept.parent / str(nearest), trunk)
            print(f"trunk at step {nearest} copied from {kept.parent / str(nearest)}", flush=True)
        at = nearest
    if at < start:
        check(train.main(train_flags(flags, faces, trunk, start, NO_END, **on)))
    if not kept.is_dir() and models.load_checkpoint(path)["step"] == start:
        tmp = kept.with_name(kept.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(trunk, tmp, ignore=lambda folder, names: [n for n in names if n not in TRUNK_FILES])
        tmp.rename(kept)


def on_device(args):
    return dict(device=args.device, workers=args.workers, precision=args.precision)


def end_share(flags):
    """The share of a run at its end that trains unlike the rest (the largest of its END_FLAGS in force)."""
    shares = [flag(flags, name, default) for name, default in END_FLAGS.items()
              if name != "--gan-last" or flag(flags, "--gan", 0.0) > 0]
    return max(shares, default=0.0)


def calibrate(flags, faces, work, seconds, **on):
    """Samples per second of a recipe on this machine (median of its log after the first steps); for a recipe with
    an adversarial end (--gan), the rate of a whole run: its steps with and without it weighted by --gan-last."""
    if flags != "tutorial" and flag(flags, "--gan", 0.0) > 0:
        plain = calibrate_phase(flags, faces, work, seconds, NO_END, **on)
        gan = calibrate_phase(flags, faces, work, seconds, dict(NO_END, **{"--gan-last": 1}), **on)
        share = flag(flags, "--gan-last", train.GAN_LAST)
        return 1 / ((1 - share) / plain + share / gan)
    return calibrate_phase(flags, faces, work, seconds, NO_END, **on)


def calibrate_phase(flags, faces, work, seconds, end, **on):
    """Samples per second of a recipe trained with the end phases `end` (see train_flags)."""
    cal = work / "calibration"
    shutil.rmtree(cal, ignore_errors=True)
    if flags == "tutorial":
        faces_a, faces_b = (train.load_training_faces(faces[s][0], quiet=True) for s in "AB")
        times = []
        for state in tutorial.steps(faces_a, faces_b):
            times.append(state["seconds"])
            if sum(times) > seconds and len(times) >= 3:
                break
        return 2 * tutorial.BATCH_SIZE * (len(times) - 1) / sum(times[1:])
    # A first guess of the speed from a short run's last log row (its first holds the start-up: loading the faces,
    # building the model, the first batches), then a run of about `seconds` of training at that speed.
    check(train.main(train_flags(strip(flags, "--warmup"), faces, cal, CALIBRATE_GUESS, end, **on)))
    guess = log_rate(cal)
    steps = CALIBRATE_GUESS + math.ceil(seconds * guess / (2 * flag(flags, "--batch-size", train.BATCH_SIZE)))
    shutil.rmtree(cal)
    check(train.main(train_flags(strip(flags, "--warmup"), faces, cal, steps, end, **on)))
    rate = log_rate(cal)
    shutil.rmtree(cal)
    return rate


def record_rate(path, name, flags, rate, same_as=None):
    """Add a recipe's measured samples/s (or `same_as` another's) to a rates file (re-read first: other runs may
    have added theirs)."""
    rates = utils.read_json(path) if path.is_file() else {}
    rates[name] = dict(samples_per_s=round(rate, 3), flags=flags, measured=time.strftime("%Y-%m-%d %H:%M"))
    if same_as:
        rates[name]["same_as"] = same_as
    utils.write_json(path, rates)
    return rates


def recipe_rate(name, flags, faces, args):
    """A recipe's samples/s, measured once per output folder (out/rates.json) and reused for every pair; a recipe
    that differs from a measured one only in its end (TAIL_FLAGS) or its seed is given that one's speed, so that both
    make the same steps (and, but for the seed, share their trunk)."""
    path = args.out / "rates.json"
    rates = utils.read_json(path) if path.is_file() else {}
    if rates.get(name, {}).get("flags") != flags:
        same = [(other, r) for other, r in rates.items()
                if flags != "tutorial" and speed_flags(r["flags"]) == speed_flags(flags)]  # "tutorial" matches no list
        if same:
            rates = record_rate(path, name, flags, same[0][1]["samples_per_s"], same_as=same[0][0])
        elif args.device != "cpu":
            raise SystemExit(f"no CPU speed of recipe {name} in {path}: measure it on the CPU first "
                             "(--calibrate-only), then train elsewhere with that file")
        else:
            threads = torch.get_num_threads()
            torch.set_num_threads(os.cpu_count() or 1)  # the speed of an idle machine, whatever --threads says
            rate = calibrate(flags, faces, args.out / "calibrating", args.calibrate_seconds)
            torch.set_num_threads(threads)
            rates = record_rate(path, name, flags, rate)
    return rates[name]["samples_per_s"]


def budget_steps(rate, minutes, batch):
    return max(1, round(rate * minutes * 60 / (2 * batch)))


# ---------------------------------------------------------------- the curve


RAW_FLAGS = "--detail 0 --sharpen 0 --crf 0"  # the model's own face: no texture from the source, no sharpening
SHEET_FRAMES = 2  # held-out frames on each budget's contact sheet
SHEET_SIZE = 512  # px of each face on it


def evaluate_budget(model_dir, test_frames, faces, names, gallery, out, every, convert_flags=""):
    """Convert A's held-out frames with the model in model_dir and measure the swap: with the model's raw output
    (RAW_FLAGS, in out/raw/, with the noise control) and with convert_video.py's defaults (in out/), or with
    `convert_flags` alone. Returns {"raw": result, "default": result} (or {"flags": result}); writes out/sheet.jpg."""
    runs = {"flags": (out, convert_flags)} if convert_flags else {"raw": (out / "raw", RAW_FLAGS),
                                                                   "default": (out, "")}
    results, swapped = {}, {}
    for kind, (folder, flags) in runs.items():
        swapped[kind] = folder / "swapped"
        shutil.rmtree(swapped[kind], ignore_errors=True)
        check(convert_video.main(["--video-path", str(test_frames), "--model-dir", str(model_dir),
                                  "--output-path", str(swapped[kind]), "--workers", "1"] + flags.split()))
        check(evaluate.main(["--converted-path", str(swapped[kind]), "--source-path", str(test_frames),
                             "--faces-a", *map(str, faces["A"][0]), "--faces-b", *map(str, faces["B"][0]),
                             "--heldout-a", *map(str, faces["A"][1]), "--heldout-b", *map(str, faces["B"][1]),
                             "--gallery", str(gallery), "--name-a", names[0], "--name-b", names[1],
                             "--model-dir", str(model_dir), "--out-dir", str(folder), "--every", str(every)]
                            + (["--noise-control"] if kind == "raw" else [])))
        results[kind] = json.loads((folder / "evaluation.json").read_text())
    contact_sheet(sheet_frames(test_frames), swapped, out / "sheet.jpg")
    for folder in swapped.values():
        shutil.rmtree(folder)
    return results


def sheet_frames(test_frames, count=SHEET_FRAMES):
    """`count` of the held-out frames, evenly spread (not the first or last)."""
    frames = utils.list_images(test_frames)
    return [frames[round(k * (len(frames) - 1) / (count + 1))] for k in range(1, count + 1)]


def contact_sheet(picks, swapped, path):
    """The frames `picks`, one row each: the source face, then each conversion's (the same name in each folder of
    `swapped`), at SHEET_SIZE px."""
    analyzer = faces.FaceAnalyzer()
    rows = []
    for frame in picks:
        source = utils.read_image(frame)
        found = analyzer.analyze(source)
        if not found:
            continue
        images = [source] + [utils.read_image(folder / (frame.stem + ".png")) for folder in swapped.values()]
        rows.append(np.hstack([evaluate.face_crop(image, found[0][1], SHEET_SIZE) for image in images]))
    if rows:
        utils.write_image(path, np.vstack(rows), jpeg_quality=90)


def gather_sheets(out, pairs, recipes, budgets, path, face=SHEET_SIZE):
    """One picture of the first frame of each budget's sheet.jpg: a row per pair and budget, the source face, then
    each recipe's raw and default faces (each `face` px), labelled."""
    rows = []
    for pair in pairs:
        for minutes in budgets:
            cells = []
            for k, recipe in enumerate(recipes):
                sheet = utils.read_image(out / pair / recipe / f"{minutes:g}min" / "sheet.jpg")
                if sheet is None:
                    raise SystemExit(f"no sheet of {pair} / {recipe} at {minutes:g} minutes: run the budget first")
                columns = ["source", f"{recipe} raw", f"{recipe} default"]
                for i in range(0 if k == 0 else 1, len(columns)):  # the source face once, from the first recipe
                    tile = cv2.resize(sheet[:SHEET_SIZE, i * SHEET_SIZE:(i + 1) * SHEET_SIZE], (face, face),
                                      interpolation=cv2.INTER_AREA)
                    cv2.putText(tile, columns[i], (6, face - 8), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1,
                                cv2.LINE_AA)
                    cells.append(tile)
            cv2.putText(cells[0], f"{pair} {minutes:g} min", (6, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.5,
                        (255, 255, 255), 1, cv2.LINE_AA)
            rows.append(np.hstack(cells))
    utils.write_image(path, np.vstack(rows), jpeg_quality=85)


CEILING_COVERAGES = (1.0, 0.8, 0.7)  # train.py --coverage values the ceiling is measured at
CEILING_SIZES = (64, 128, 256)  # and the sizes of the models' faces (256: tiny128_detail's)


def ceiling(pair, out, every, cases):
    """What a perfect model could reach, for each (size, coverage) in `cases`: a model of `size` px that draws the
    square of `coverage` (train.py --coverage). The faces are found once per pair, then cut out for every case.

    Detail: A's own held-out faces, cut out as the model sees them and pasted back with the raw conversion (no
    colour change, texture or sharpening): fine and feature-scale ratios. Likeness: B's own held-out faces (B's
    held-out frames in turn, in their own pose) cut out alike and pasted over A's with the raw conversion, measured
    as evaluate.py measures a swap (transfer index): how much of B the pasted square can carry at all."""
    faces_, test_frames = prepare_pair(pair, out)
    analyzer, embedder = faces.FaceAnalyzer(), faces.FaceEmbedder()
    plain = blend.BlendSettings(color="none", sharpen=0, detail=0)
    raw = blend.BlendSettings(sharpen=0, detail=0)  # convert_video.py with RAW_FLAGS (colour matched)
    reference = faces.person_embedding(faces_["B"][0])
    heldout = float(np.linalg.norm(faces.face_embeddings(faces_["B"][1]) - reference, axis=1).mean())
    donors = []  # B's held-out frames and their landmarks
    for folder in faces_["B"][1]:
        for path in utils.list_images(folder.parent / "heldout")[::3]:
            if found := analyzer.analyze(image := utils.read_image(path)):
                donors.append((image, found[0][1]))
    targets = []  # A's held-out frames: landmarks, face interior, detail of the real face, distance to B
    for path in utils.list_images(test_frames)[::every]:
        if found := analyzer.analyze(frame := utils.read_image(path)):
            landmarks = found[0][1]
            interior = align.face_interior_mask(landmarks, frame.shape)
            targets.append((frame, landmarks, interior, align.sharpness(frame, landmarks, interior),
                            evaluate.feature_sharpness(frame, landmarks, interior),
                            np.linalg.norm(embedder.embed(frame, landmarks) - reference)))
    rows = []
    for size, coverage in cases:
        fine, feature, source, swapped = [], [], [], []
        for k, (frame, landmarks, interior, frame_fine, frame_feature, frame_distance) in enumerate(targets):
            matrix = align.align_matrix(landmarks, size, coverage)
            pasted = blend.paste_face(frame, align.warp_face(frame, matrix, size), matrix, landmarks, plain)
            fine.append(align.sharpness(pasted, landmarks, interior) / frame_fine)
            feature.append(evaluate.feature_sharpness(pasted, landmarks, interior) / frame_feature)
            image, donor_landmarks = donors[k % len(donors)]
            donor = align.warp_face(image, align.align_matrix(donor_landmarks, size, coverage), size)
            swap = blend.paste_face(frame, donor, matrix, landmarks, raw)
            if again := analyzer.analyze(swap):
                source.append(frame_distance)
                swapped.append(np.linalg.norm(embedder.embed(swap, again[0][1]) - reference))
        distances = dict(mean_distance_source_to_B=float(np.mean(source)), mean_distance_to_B=float(np.mean(swapped)))
        rows.append(dict(pair=pair, size=size, coverage=coverage, frames=len(fine),
                         fine=round(float(np.mean(fine)), 3), feature_scale=round(float(np.mean(feature)), 3),
                         transfer=round(evaluate.transfer_index(distances, "B", heldout), 3)))
    return rows


def summary_row(pair, recipe, minutes, steps, results):
    """One row of the summary: the figures of the raw output (the headline) and of the default conversion."""
    row = dict(pair=pair, recipe=recipe, minutes=minutes, steps=steps)
    for kind, result in results.items():
        ident, sharp = result["identity"], result["sharpness"]
        own, swap = (result.get("reconstruction", {}).get(k, {}) for k in ("B->B", "A->B"))
        prefix = "" if kind != "default" else "default_"
        row.update({f"{prefix}{k}": v for k, v in dict(
            top1=ident["top1_retrieval"], rank=ident["mean_rank_of_target"],
            two_person=next(v for k, v in ident.items() if k.startswith("two_person")),
            distance_b=ident["mean_distance_to_B"], source_distance_b=ident.get("mean_distance_source_to_B"),
            heldout_b_distance=ident.get("heldout_B_distance_to_B"), transfer=ident.get("transfer_index"),
            sharpness=sharp["ratio"], feature_sharpness=sharp.get("feature_scale_ratio"),
            noise_sharpness=sharp.get("noise_control", {}).get("ratio"),
            noise_feature_sharpness=sharp.get("noise_control", {}).get("feature_scale_ratio"),
            pose_deg=result["pose"]["error_deg"], landmarks=result["expression"]["landmark_error_over_inter_ocular"],
            mouth=result["expression"].get("mouth_correlation"),
            flicker=result["flicker"]["ratio"], ssim_face_b=own.get("ssim_face"),
            view_detail_b=own.get("detail"), view_detail_swap=swap.get("detail"),
            view_detail_half_b=own.get("detail_half"), view_detail_half_swap=swap.get("detail_half"),
            view_contrast_b=own.get("contrast"), view_contrast_swap=swap.get("contrast")).items()})
    return row


def after_model(pair_dir, after, minutes):
    """(this budget's --init, the steps it was trained for, the minutes left) for a recipe with --after `after`."""
    base, _, base_minutes = after.partition(":")
    if not re.fullmatch(r"\d+(\.\d+)?", base_minutes):
        raise SystemExit(f"{AFTER} {after}: give RECIPE:MINUTES, e.g. tiny128_cover80_lr5_b8:60")
    base_minutes = float(base_minutes)
    if minutes <= base_minutes:
        raise SystemExit(f"{AFTER} {base}:{base_minutes:g} goes on from {base_minutes:g} minutes: "
                         f"give budgets above that, not {minutes:g}")
    kept = pair_dir / base / f"{base_minutes:g}min" / "model"
    if not (kept / "trained.json").is_file():
        raise SystemExit(f"{kept} is missing: train recipe {base} for {base_minutes:g} minutes first")
    return kept / models.CHECKPOINT, utils.read_json(kept / "trained.json")["steps"], minutes - base_minutes


def run_recipe(pair, spec, args, gallery):
    name, given = recipe_flags(spec)
    after = flag(given, AFTER, "") if given != "tutorial" else ""  # a bench flag: train.py is given the rest
    flags = strip(given, AFTER) if after else given
    faces, test_frames = prepare_pair(pair, args.out)
    names = PAIRS[pair][2:]
    work = args.out / pair / name
    work.mkdir(parents=True, exist_ok=True)
    rate = recipe_rate(name, flags, faces, args)
    batch = tutorial.BATCH_SIZE if flags == "tutorial" else flag(flags, "--batch-size", 64)
    print(f"\n== {pair} / {name}: {rate:.1f} samples/s on this machine", flush=True)
    rows = []
    trunk = work / "model"
    loop = None
    on = on_device(args)
    for minutes in sorted(args.budgets):
        steps = budget_steps(rate, minutes, batch)
        if after:  # the steps of the model it goes on from, then this recipe's for the minutes left
            init, base_steps, left = after_model(args.out / pair, after, minutes)
            steps = base_steps + budget_steps(rate, left, batch)
        kept = work / f"{minutes:g}min" / "model"  # this budget's model (weights only)
        out = kept.parent if not args.convert_flags else work / f"{minutes:g}min_{slug(args.convert_flags)}"
        started = time.time()
        if args.stage == "evaluate":
            fill_identities(kept / models.CHECKPOINT, faces)
        elif after:
            model_dir = work / "branch"
            shutil.rmtree(model_dir, ignore_errors=True)
            check(train.main(train_flags(flags + ["--init", str(init)], faces, model_dir, steps - base_steps, **on)))
        elif flags == "tutorial":
            loop = loop or tutorial_loop(faces, trunk / models.CHECKPOINT)
            model_dir = train_tutorial(loop, steps, trunk)
        else:
            end = end_share(flags)
            if end > 0:  # a trunk to where this budget's end begins (without warp, with --gan), then a branch
                start = round((1 - end) * steps)
                train_trunk(flags, faces, trunk, start, args.out / pair, **on)
                model_dir = work / "branch"
                shutil.rmtree(model_dir, ignore_errors=True)
                shutil.copytree(trunk, model_dir)
                check(train.main(train_flags(flags, faces, model_dir, steps, **on)))
            else:
                check(train.main(train_flags(flags, faces, trunk, steps, **on)))
                model_dir = trunk
        if args.stage != "evaluate":
            seconds = round(time.time() - started, 1)
            keep_model(model_dir / models.CHECKPOINT, kept, dict(device=device_name(args.device), steps=steps,
                                                                 seconds=seconds),
                       steps - base_steps if after else steps)
            print(f"{pair} / {name} / {minutes:g} min: {steps} steps in {seconds:.0f} s -> {kept}", flush=True)
            if args.stage == "train":
                continue
        results = evaluate_budget(kept, test_frames, faces, names, gallery, out, args.eval_every,
                                  args.convert_flags)
        row = summary_row(pair, name + (f" ({args.convert_flags})" if args.convert_flags else ""), minutes, steps,
                          results)
        trained = utils.read_json(kept / "trained.json")
        row.update(samples_per_s=round(rate, 2), trained_on=trained["device"], train_wall_s=trained["seconds"])
        utils.write_json(out / "budget.json", dict(row, recipe_flags=given))
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def keep_model(path, folder, trained, step):
    """This budget's model, weights only and what convert_video.py reads beside them, and where it was trained;
    `step` is the step it must be at (a model trained past it is not this budget's)."""
    ckpt = models.load_checkpoint(path)
    if ckpt["step"] != step:
        raise SystemExit(f"{path} is at step {ckpt['step']}, not this budget's {step}: move {path.parent} away to "
                         "train this budget again")
    folder.mkdir(parents=True, exist_ok=True)
    models.save_checkpoint(folder, {k: ckpt[k] for k in ("model", "config", "step", "identities", "reach")
                                    if k in ckpt},
                          is_best=False)
    utils.write_json(folder / "trained.json", trained)


def slug(text):
    return re.sub(r"[^A-Za-z0-9.]+", "_", text).strip("_")


def device_name(device):
    """'cpu', or the GPU's name: where a budget's steps were trained."""
    return device if device == "cpu" else f"{device} ({torch.cuda.get_device_name(torch.device(device))})"


def fill_identities(path, faces):
    """Give a checkpoint trained without dlib (--stage train on a GPU machine) the people's identities, as
    train.py records them, so that convert_video.py picks the person the same way."""
    if not path.is_file():
        raise SystemExit(f"no model at {path}: train it first (--stage train)")
    ckpt = models.load_checkpoint(path)
    if ckpt.get("identities"):
        return
    ckpt["identities"] = {s.lower(): train.person_identity(faces[s][0]) for s in "AB"}
    models.save_checkpoint(path.parent, ckpt, is_best=False)


def tutorial_loop(faces, path):
    """The tutorial's loop, going on from the checkpoint at `path` if an earlier run left one."""
    resume = models.load_checkpoint(path) if path.is_file() else None
    return tutorial.steps(*(train.load_training_faces(faces[s][0], quiet=True) for s in "AB"), resume=resume)


def train_tutorial(loop, steps, model_dir, save_every=TUTORIAL_SAVE_EVERY):
    """Run the tutorial's loop to `steps`, saving a checkpoint (with both optimizers) into model_dir every
    `save_every` steps and at the end: a killed run goes on from there."""
    path = model_dir / models.CHECKPOINT
    done = models.load_checkpoint(path)["step"] if path.is_file() else 0
    if done > steps:
        raise SystemExit(f"{path} is at step {done}, past this budget's {steps}: move it away to train again")
    model_dir.mkdir(parents=True, exist_ok=True)
    while done < steps:
        state = next(loop)
        done = state["step"]
        if done == steps or done % save_every == 0:
            models.save_checkpoint(model_dir, tutorial.checkpoint(state), is_best=False)
    return model_dir


def merge_summary(path, rows):
    """Put this run's rows into the summary file, replacing their earlier versions. The file is re-read first:
    another run into the same folder (another pair or recipe) may have added its rows since this one began."""
    done = {(r["pair"], r["recipe"], r["minutes"]) for r in rows}
    previous = utils.read_json(path) if path.is_file() else []
    merged = [r for r in previous if (r["pair"], r["recipe"], r["minutes"]) not in done] + rows
    utils.write_json(path, merged)
    return merged


def markdown(rows):
    """The summary as a table: the raw output's figures first (the model's own face), then the default
    conversion's detail figures."""
    head = ("| pair | recipe | minutes | steps | ID top-1 | transfer | distance to B (A's own; real B) | "
            "fine detail | at feature scale | noise control: fine, feature | default: fine, feature | "
            "model view B->B: fine, half, contrast | model view A->B: fine, half, contrast | "
            "pose (deg) | landmarks | mouth | flicker | trained on |\n" + "|---" * 18 + "|\n")

    def num(value, digits=2):  # a figure that rows made before it existed lack
        return "-" if value is None else f"{value:.{digits}f}"

    return head + "".join(
        f"| {r['pair']} | {r['recipe']} | {r['minutes']:g} | {r['steps']} | {num(r['top1'])} | "
        f"{num(r.get('transfer'))} | {num(r.get('distance_b'))} ({num(r.get('source_distance_b'))}; "
        f"{num(r.get('heldout_b_distance'))}) | {num(r['sharpness'], 3)} | {num(r.get('feature_sharpness'), 3)} | "
        f"{num(r.get('noise_sharpness'))}, {num(r.get('noise_feature_sharpness'), 3)} | "
        f"{num(r.get('default_sharpness'), 3)}, {num(r.get('default_feature_sharpness'), 3)} | "
        f"{num(r.get('view_detail_b'))}, {num(r.get('view_detail_half_b'))}, {num(r.get('view_contrast_b'))} | "
        f"{num(r.get('view_detail_swap'))}, {num(r.get('view_detail_half_swap'))}, "
        f"{num(r.get('view_contrast_swap'))} | "
        f"{num(r['pose_deg'])} | {num(r['landmarks'], 3)} | {num(r.get('mouth'))} | {num(r['flicker'])} | "
        f"{r.get('trained_on', 'cpu')} |\n"
        for r in rows)


def main(argv=None):
    args = parse_args(argv)
    if args.stage != "train" and not (args.calibrate_only and args.device != "cpu"):
        require_data()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.sheet:
        gather_sheets(args.out, args.pairs, [recipe_flags(spec)[0] for spec in args.recipes], args.budgets, args.sheet)
        return 0
    if args.ceiling:
        cases = [(size, coverage) for coverage in CEILING_COVERAGES for size in CEILING_SIZES]
        rows = [row for pair in args.pairs for row in ceiling(pair, args.out, args.eval_every, cases)]
        utils.write_json(args.out / "ceiling.json", rows)
        print(json.dumps(rows, indent=1))
        return 0
    if args.calibrate_only:
        pair_faces, _ = prepare_pair(args.pairs[0], args.out)
        for spec in args.recipes:
            name, flags = recipe_flags(spec)
            if args.device == "cpu":
                print(f"{name}: {recipe_rate(name, flags, pair_faces, args):.2f} samples/s")
            else:  # another device's speed, for comparison only (budgets stay minutes of this CPU)
                rate = calibrate(flags, pair_faces, args.out / "calibrating", args.calibrate_seconds, **on_device(args))
                print(f"{name} on {args.device}: {rate:.2f} samples/s")
                record_rate(args.out / f"rates_{args.device.replace(':', '')}.json", name, flags, rate)
        return 0
    gallery = None
    if args.stage != "train":  # only runs evaluate; its people's embeddings computed now, once, not by each budget
        gallery = demo.make_gallery(args.out / "gallery")
        evaluate.load_gallery(gallery, faces.FaceAnalyzer(), faces.FaceEmbedder())
    rows = []
    summary = args.out / "summary.json"
    for pair in args.pairs:
        for spec in args.recipes:
            rows += run_recipe(pair, spec, args, gallery)
            if args.stage == "train":
                continue
            merged = merge_summary(summary, rows)
            utils.write_bytes_atomic(args.out / "summary.md", markdown(merged).encode())
    if rows:
        print(markdown(rows))


if __name__ == "__main__":
    sys.exit(main())
