"""Benchmark train.py's step (samples/s) against a faithful re-implementation of the tutorial's step.

The tutorial's step: two Adam optimizers (encoder+decoder A, encoder+decoder B, so the encoder is
stepped twice), fp32, NCHW, augmentation done inline in the training loop. Ours: one fused Adam,
batches prepared in a DataLoader worker, channels_last, bf16 autocast (where the CPU has it) or fp32.
All on the same real faces (Obama / Andrew) in one run, batch 64+64 by default.

    python benchmarks/bench_train.py --steps 3 --out bench_out/train.json
    python benchmarks/bench_train.py --curve-steps 200 --batch-size 16    # loss curves, ours vs tutorial
    python benchmarks/bench_train.py --precision --steps 10 --batch-size 16   # fp32 vs bf16, every preset
    python benchmarks/bench_train.py --before f253d8e --steps 200 --repeats 3   # train.py's default recipe, now vs then
"""
import argparse
import itertools
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import tutorial
from common import ROOT, VIDEOS, checkout, log_rate, report, require_data

import crop_face
import crop_from_video
import models
import train
import utils


def extract_faces(tmp, frames):
    """Folders of Obama's and Andrew Ng's faces from the first `frames` frames of their clips."""
    folders = []
    for clip, name in (("styletalk_obama_clip1.mp4", "A"), ("styletalk_andrew_clip1.mp4", "B")):
        crop_from_video.main(["--video-path", str(VIDEOS / clip), "--save-dir", str(tmp / name),
                              "--max-frames", str(frames)])
        crop_face.main(["--images-dir", str(tmp / name), "--faces-dir", str(tmp / f"{name}_face")])
        folders.append(tmp / f"{name}_face")
    return folders


def prepare_faces(tmp, frames):
    return [train.load_training_faces([folder], quiet=True) for folder in extract_faces(tmp, frames)]


def tutorial_steps(faces_a, faces_b, batch_size, steps):
    """The tutorial's loop (benchmarks/tutorial.py): yields (loss_a, loss_b, seconds) per step."""
    for state in itertools.islice(tutorial.steps(faces_a, faces_b, batch_size), steps):
        yield state["loss_a"], state["loss_b"], state["seconds"]


def our_steps(faces_a, faces_b, batch_size, steps, precision, seed=0, workers=1, preset="original"):
    """train.py's own step function and loader: yields (loss_a, loss_b, seconds) per step."""
    torch.manual_seed(seed)
    device = torch.device("cpu")
    model = models.build_model(models.model_config(preset)).to(memory_format=torch.channels_last)
    opt = train.make_optimizer(model, 5e-5)
    dtype = utils.pick_precision(precision, device)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    net = train.BothSides(model)
    loader = iter(train.batch_loader(train.StepBatches(faces_a, faces_b, batch_size, model.input_size, seed), 0,
                                     workers))
    for _ in range(steps):
        t = time.perf_counter()
        batch = next(loader)
        loss_a, loss_b = train.train_step(net, opt, batch, train.reconstruction_loss("l1"), device, dtype, scaler)
        yield loss_a, loss_b, time.perf_counter() - t


def samples_per_s(step_iter, batch_size, warmup=1):
    times = [t for _, _, t in step_iter][warmup:]
    return round(2 * batch_size * len(times) / sum(times), 2)


def precision_rates(steps, batch_size, frames, presets=("tiny", "lite128", "original")):
    """samples/s of train.py's step for each preset in fp32 and in bf16 autocast, on the same faces."""
    with tempfile.TemporaryDirectory() as tmp:
        faces_a, faces_b = prepare_faces(Path(tmp), frames)
    rows = []
    for preset in presets:
        row = dict(preset=preset)
        for precision in ("fp32", "bf16"):
            row[f"{precision}_samples_per_s"] = samples_per_s(
                our_steps(faces_a, faces_b, batch_size, steps + 1, precision, preset=preset), batch_size)
        row["bf16_over_fp32"] = round(row["bf16_samples_per_s"] / row["fp32_samples_per_s"], 2)
        rows.append(row)
    return dict(benchmark="train precision", batch_size_per_side=batch_size, timed_steps=steps,
                chosen_by_auto=str(utils.pick_precision("auto", torch.device("cpu"))), rows=rows)


def recipe_rate(root, faces, model_dir, steps):
    """samples/s of `root`/train.py with its own defaults for `steps` steps, as a user runs it (a fresh process,
    its batch-making worker included), from its log."""
    subprocess.run([sys.executable, str(root / "train.py"), "--faces-a", str(faces[0]), "--faces-b", str(faces[1]),
                    "--model-dir", str(model_dir), "--iterations", str(steps), "--save-every", str(steps),
                    "--preview-every", str(steps)], check=True, capture_output=True)
    return log_rate(model_dir)


def recipe_rates(before, steps, repeats, frames):
    """train.py's default recipe here and at commit `before`, on the same faces, alternating, best of `repeats`."""
    require_data()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        faces = extract_faces(tmp, frames)
        ours, then = [], []
        with checkout(before, tmp / "before") as old:
            for _ in range(repeats):
                for root, rates in ((ROOT, ours), (old, then)):
                    rates.append(recipe_rate(root, faces, tmp / f"model_{len(ours)}_{len(then)}", steps))
    return dict(benchmark="train recipe", before_commit=before, steps=steps, repeats=repeats,
                ours_samples_per_s=round(max(ours), 2), before_samples_per_s=round(max(then), 2),
                speedup=round(max(ours) / max(then), 3), ours_all=[round(r, 2) for r in ours],
                before_all=[round(r, 2) for r in then])


def run(steps=3, batch_size=64, curve_steps=0, frames=300):
    require_data()
    torch.set_num_threads(torch.get_num_threads())
    with tempfile.TemporaryDirectory() as tmp:
        faces_a, faces_b = prepare_faces(Path(tmp), frames)
    n = steps + 1  # +1 warm-up step, not timed
    base = samples_per_s(tutorial_steps(faces_a, faces_b, batch_size, n), batch_size)
    fp32 = samples_per_s(our_steps(faces_a, faces_b, batch_size, n, "fp32"), batch_size)
    result = dict(benchmark="train", batch_size_per_side=batch_size, timed_steps=steps,
                  bf16_supported=utils.cpu_supports_bf16(), tutorial_samples_per_s=base,
                  ours_fp32_samples_per_s=fp32, ours_fp32_speedup=round(fp32 / base, 2))
    if utils.cpu_supports_bf16():
        bf16 = samples_per_s(our_steps(faces_a, faces_b, batch_size, n, "bf16"), batch_size)
        result.update(ours_bf16_samples_per_s=bf16, ours_bf16_speedup=round(bf16 / base, 2))
    if curve_steps:
        default = "bf16" if utils.cpu_supports_bf16() else "fp32"
        tut = [a + b for a, b, _ in tutorial_steps(faces_a, faces_b, batch_size, curve_steps)]
        ours = [a + b for a, b, _ in our_steps(faces_a, faces_b, batch_size, curve_steps, default)]
        tail = max(1, curve_steps // 10)
        result["loss_curve"] = dict(
            steps=curve_steps, batch_size=batch_size, ours_precision=default,
            tutorial_first=round(tut[0], 4), ours_first=round(ours[0], 4),
            tutorial_last_mean=round(float(np.mean(tut[-tail:])), 4),
            ours_last_mean=round(float(np.mean(ours[-tail:])), 4),
            tutorial_every_10=[round(v, 4) for v in tut[::10]], ours_every_10=[round(v, 4) for v in ours[::10]])
    return result


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant (after one warm-up)")
    p.add_argument("--batch-size", type=int, default=64, help="faces per side")
    p.add_argument("--curve-steps", type=int, default=0, help="also compare loss curves over this many steps")
    p.add_argument("--frames", type=int, default=300, help="frames per clip to take faces from")
    p.add_argument("--precision", action="store_true",
                   help="only train.py's step of each preset, fp32 against bf16 (e.g. --steps 10 --batch-size 16)")
    p.add_argument("--before", metavar="COMMIT", default=None,
                   help="only train.py's default recipe (its own defaults, a fresh process), here against COMMIT")
    p.add_argument("--repeats", type=int, default=3, help="with --before: runs of each, the fastest counts")
    p.add_argument("--out", default=None, help="write the JSON here too")
    a = p.parse_args()
    if a.before:
        report(recipe_rates(a.before, a.steps, a.repeats, a.frames), a.out)
    else:
        report(precision_rates(a.steps, a.batch_size, a.frames) if a.precision else
               run(a.steps, a.batch_size, a.curve_steps, a.frames), a.out)
