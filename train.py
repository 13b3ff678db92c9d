"""Step 3: train the shared encoder and the two decoders on aligned faces.

Reads the 256x256 faces of crop_face.py from FACES_A and FACES_B; each step
draws a batch per side, augments it as the tutorial does (random transform,
then random warp: warped input, Umeyama-aligned target), and trains the
autoencoder A->A and B->B with one Adam optimizer over all parameters.
Writes to MODEL_DIR:
    checkpoint.pt        latest (model, optimizer, step, model config), saved atomically
    checkpoint_best.pt   copy of the checkpoint with the lowest loss so far
    preview.png          rows: A, A->A, A->B, B, B->B, B->A
    log.csv              step, losses, samples/s
    train_settings.json  the settings of the last run
Running again resumes from checkpoint.pt; --iterations is the total step count
to reach. Ctrl-C saves and stops (exit code 130); so does SIGTERM (`kill`, a batch scheduler's time
limit, `docker stop`; exit code 143). Batches are a pure function of (seed, step, rank), so a resumed
run continues exactly as an uninterrupted one.

Example (the CPU recipe, one hour):
    python train.py --faces-a train/personA_face --faces-b train/personB_face --model-dir models --minutes 60
The tutorial's recipe:
    python train.py --model original --loss l1 --batch-size 64 --lr 5e-5 --warmup 0 --no-warp-last 0
Tiny CPU run (a few minutes):
    python train.py --model tiny --batch-size 16 --iterations 200 --model-dir /tmp/tiny
Several GPUs or machines (see README):
    torchrun --nproc_per_node 4 train.py --model lite128 --batch-size 64
"""
import argparse
import contextlib
import csv
import dataclasses
import io
import math
import os
import signal
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import align
import faces
import models
import records
import tensors
import utils

FACES_A = Path("train/personA_face")  # aligned faces of person A (crop_face.py output)
FACES_B = Path("train/personB_face")  # aligned faces of person B
MODEL_DIR = Path("models")            # checkpoints, preview, log
# The recipe measured best per CPU minute (docs/QUALITY.md, benchmarks/bench_quality.py). The tutorial's own:
# --model original --loss l1 --batch-size 64 --lr 5e-5 --warmup 0 --no-warp-last 0
MODEL = "tiny"                        # a preset of models.MODEL_CONFIGS (tiny128, lite128: 128 px, ~2x, ~4x the time)
BATCH_SIZE = 16                       # faces per side per step (per process under torchrun)
ITERATIONS = 100_000                  # total steps to reach (0 = until --minutes or Ctrl-C)
MINUTES = 0.0                         # stop after this many minutes of this run (0 = no limit)
LEARNING_RATE = 2e-4
WARMUP = 100                          # steps of linear learning-rate warm-up
LOSS = "masked"                       # masked (DSSIM + MSE in the face, eyes and mouth weighted), l1, ssim+l1
NO_WARP_LAST = 0.2                    # share of the run at the end without random warp
LR_FINAL = 1.0                        # the learning rate at the end, a share of LEARNING_RATE (1 = no decay)
EDGES = 0.0                           # weight of the masked loss's edge term (0 = none; 5-15 measured no gain)
GAN = 0.0                             # weight of the adversarial loss on the faces drawn (0 = none)
GAN_LAST = 0.5                        # share of the run at the end with it (it sharpens a model that has settled)
GAN_SWAPS = True                      # the discriminators also judge the swaps, not only the reconstructions
LIKENESS = 0.0                        # weight of the code discriminator's loss (0 = none)
COVERAGE = 1.0                        # share of the model's square the face's features fill (1 = the tutorial's)
SAVE_EVERY = 250                      # steps between checkpoints
PREVIEW_EVERY = 250                   # steps between preview images
LOG_EVERY = 10                        # steps between log.csv rows
DETAIL_SHARE = 0.5                    # share of each side's batch the detail stages (tiny_detail) learn from
MIN_FACES_WARNING = 200               # fewer faces per side than this gives a warning


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--faces-a", type=Path, nargs="+", default=[FACES_A],
                   help="aligned faces of person A (one or more folders)")
    p.add_argument("--faces-b", type=Path, nargs="+", default=[FACES_B],
                   help="aligned faces of person B (one or more folders)")
    p.add_argument("--model-dir", type=Path, default=MODEL_DIR, help="checkpoints, preview and log go here")
    p.add_argument("--model", choices=list(models.MODEL_CONFIGS), default=MODEL, help="model preset")
    p.add_argument("--batch-size", type=utils.positive_int, default=BATCH_SIZE,
                   help="faces per side per step (per process)")
    p.add_argument("--iterations", type=utils.non_negative_int, default=ITERATIONS,
                   help="total steps to reach (0 = no limit)")
    p.add_argument("--minutes", type=utils.non_negative_number, default=MINUTES,
                   help="stop after this many minutes (0 = no limit)")
    p.add_argument("--lr", type=utils.non_negative_number, default=LEARNING_RATE, help="Adam learning rate")
    p.add_argument("--warmup", type=utils.non_negative_int, default=WARMUP,
                   help="steps over which the learning rate rises linearly to --lr (0 = none)")
    p.add_argument("--loss", choices=["l1", "ssim+l1", "masked"], default=LOSS,
                   help="l1: the tutorial's; masked: DSSIM + MSE inside the face, eyes x3, mouth x2")
    p.add_argument("--edges", type=utils.non_negative_number, default=EDGES,
                   help="masked loss: weight of an L1 on the image gradients inside the face, which penalises "
                        "blurred edges (the gradient difference loss; 0 = none; no gain measured, docs/QUALITY.md)")
    p.add_argument("--no-warp-last", type=utils.share, default=NO_WARP_LAST,
                   help="share of the run (of --iterations, or of --minutes) trained without the random warp "
                        "at the end, which sharpens the result (DeepFaceLab does this)")
    p.add_argument("--lr-final", type=utils.share, default=LR_FINAL,
                   help="the learning rate at the end of the run, as a share of --lr: it falls linearly to it over "
                        "that end without warp (1 = no decay)")
    p.add_argument("--gan", type=utils.non_negative_number, default=GAN,
                   help="weight of an adversarial loss: a patch discriminator per person learns to tell that person's "
                        "real faces from those the decoder draws (of the person and swapped from the other one), "
                        "and the decoders learn to fool it (DeepFaceLab's gan_power; 0 = none)")
    p.add_argument("--gan-last", type=utils.share, default=GAN_LAST,
                   help="share of the run (of --iterations, or of --minutes) at the end with --gan on")
    p.add_argument("--gan-swaps", action=argparse.BooleanOptionalAction, default=GAN_SWAPS,
                   help="with --gan the discriminators also judge the swaps (each person drawn by the other's "
                        "decoder); --no-gan-swaps judges each decoder's own reconstructions only (DeepFaceLab's "
                        "way), which costs less per step")
    p.add_argument("--likeness", type=utils.non_negative_number, default=LIKENESS,
                   help="weight of a code discriminator's loss: it learns whose face a bottleneck code came from, and "
                        "the encoder learns to make A's and B's codes alike, so that B's decoder draws B from A's "
                        "codes (DeepFaceLab's true_face_power; 0 = none)")
    p.add_argument("--coverage", type=utils.number(align.FACE_COVERAGE, 1), default=COVERAGE,
                   help="how much of the model's square the face's features (brows to lips) fill, from "
                        f"{align.FACE_COVERAGE} to 1: 1 is the tutorial's tight crop, which leaves the chin, jaw and "
                        "cheeks of the face being replaced; 0.8 takes them in (more of the new person's face shape, "
                        "fewer pixels for each feature; docs/QUALITY.md). Kept in the checkpoint")
    p.add_argument("--init", type=Path, default=None,
                   help="start a new model from this checkpoint's weights (a pretrained base of the same --model)")
    p.add_argument("--init-parts", choices=["all", "encoder"], default="all",
                   help="what --init copies: all (encoder and both decoders), or the encoder alone, so the new "
                        "decoders learn only A's and B's faces (faceswap's way of starting from a base)")
    p.add_argument("--freeze-encoder", action="store_true",
                   help="keep the encoder's weights as --init gave them: only the decoders learn, and a step "
                        "costs less (no gradient through the encoder)")
    p.add_argument("--pretrain", action="store_true",
                   help="train a base: both decoders learn every face of --faces-a and --faces-b (many people)")
    utils.add_device_args(p, "training")
    p.add_argument("--save-every", type=utils.positive_int, default=SAVE_EVERY, help="steps between checkpoints")
    p.add_argument("--preview-every", type=utils.positive_int, default=PREVIEW_EVERY, help="steps between preview PNGs")
    p.add_argument("--log-every", type=utils.positive_int, default=LOG_EVERY, help="steps between log rows")
    p.add_argument("--workers", type=utils.non_negative_int, default=max(1, min(4, (os.cpu_count() or 2) - 1)),
                   help="DataLoader processes preparing batches (0 = in the main process)")
    p.add_argument("--seed", type=int, default=0, help="seed for the weights and the batches")
    args = p.parse_args(argv)
    if args.edges and args.loss != "masked":
        p.error("--edges is a term of the masked loss: use it with --loss masked")
    if {f.resolve() for f in args.faces_a} & {f.resolve() for f in args.faces_b} and not args.pretrain:
        p.error("--faces-a and --faces-b share a folder: a model of a person swapped with themself learns nothing "
                "a swap can use; give each person's own faces (or --pretrain for a base)")
    return args


# ---------------------------------------------------------------- data


FLIP = 0.4  # the share of training faces random_transform mirrors


def random_transform(size, rng, rotation=10, zoom=0.05, shift=0.05, flip=FLIP):
    """3x3 matrix of a random rotation/zoom/shift and horizontal flip of a size x size face, as the tutorial's.

    The tutorial warped the whole face with it before random_warp; random_warp folds it into its own
    sampling instead: one interpolation instead of two, and a fifth of the pixels to warp."""
    angle = rng.uniform(-rotation, rotation)
    scale = rng.uniform(1 - zoom, 1 + zoom)
    tx, ty = rng.uniform(-shift, shift) * size, rng.uniform(-shift, shift) * size
    mat = np.vstack([cv2.getRotationMatrix2D((size // 2, size // 2), angle, scale), [0, 0, 1]])
    mat[:2, 2] += (tx, ty)
    if rng.random() < flip:
        mat = np.array([[-1.0, 0, size - 1], [0, 1, 0], [0, 0, 1]]) @ mat
    return mat


def random_warp(image, rng, size=64, share=align.FACE_COVERAGE, sigma=5.0, transform=None, detail_size=None):
    """(warped input, target) at size x size from a 256 face, as the tutorial (and with detail_size, the same
    target at detail_size x detail_size as a third item).

    A 5x5 grid over the central `share` of the face (what the model sees) is jittered by N(0, sigma px);
    the input is remapped through the jittered grid, the target is the same region
    taken with the similarity fit of the jittered grid to the regular one. `transform`
    (random_transform's matrix) moves the face first, as if the image had been warped by it.
    """
    full = image.shape[0]
    half = full * share / 2
    grid = np.linspace(full / 2 - half, full / 2 + half, 5)
    mapx = np.broadcast_to(grid, (5, 5)) + rng.normal(0, sigma * full / 256, (5, 5))
    mapy = np.broadcast_to(grid, (5, 5)).T + rng.normal(0, sigma * full / 256, (5, 5))
    src = np.stack([mapx.ravel(), mapy.ravel()], axis=-1)  # in the moved face's pixels
    transform = np.eye(3) if transform is None else transform
    mapx, mapy = align.transform_points(src, np.linalg.inv(transform)[:2]).reshape(5, 5, 2).transpose(2, 0, 1)
    pad = size // 8  # resize the 5x5 grid to size*1.25 and keep the inner size x size
    interp_x = cv2.resize(mapx, (size + 2 * pad, size + 2 * pad))[pad:-pad, pad:-pad].astype(np.float32)
    interp_y = cv2.resize(mapy, (size + 2 * pad, size + 2 * pad))[pad:-pad, pad:-pad].astype(np.float32)
    warped = cv2.remap(image, interp_x, interp_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    dst = np.mgrid[0:size + 1:size // 4, 0:size + 1:size // 4].T.reshape(-1, 2)
    mat = (align.umeyama(src, dst) @ transform)[:2]
    # bilinear, as before: warpAffine has no INTER_AREA (it falls back to bilinear)
    target = cv2.warpAffine(image, mat, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    if detail_size is None:
        return warped, target
    big = cv2.warpAffine(image, mat * (detail_size / size), (detail_size, detail_size), flags=cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_REPLICATE)
    return warped, target, big


def region_weights(landmarks, size=align.FACE_SIZE, brow_lift=1.0):
    """uint8 (size, size) map of where the loss looks in an aligned face: 0 outside the face, else
    WEIGHT_SCALE x (1 in the face hull with the brows raised over the forehead and out over the temples, a little
    more than convert_video.py pastes; 3 around the eyes; 2 around the mouth: faceswap's eye and mouth multipliers)."""
    if not np.isfinite(landmarks).all():  # a face with no alignment record: the mean face's region
        landmarks = np.zeros((68, 2))
        inner = size * align.FACE_COVERAGE
        landmarks[align.ALIGN_POINTS] = align.MEAN_FACE * inner + (size - inner) / 2
        landmarks[align.JAW] = landmarks[align.MOUTH].mean(0)  # no jaw in the template: the hull ends at the mouth
    weights = align.face_hull_mask(landmarks, (size, size), brow_lift, outward=True)
    grow = 2 * int(0.15 * align.inter_ocular(landmarks)) + 1
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (grow, grow))
    for part, weight in ((align.MOUTH, 2.0), (align.LEFT_EYE, 3.0), (align.RIGHT_EYE, 3.0)):
        region = cv2.dilate(align.face_hull_mask(landmarks[part], (size, size)), kernel)
        weights = np.maximum(weights, region * weight)
    return np.round(weights * WEIGHT_SCALE).astype(np.uint8)


WEIGHT_SCALE = 60  # region weights are stored as uint8 = weight x 60 (so 3.0 -> 180)


def region_reach(faces, size, share, flip=FLIP):
    """uint8 (size, size): for each pixel of the model's view, the share (x 255) of a side's training faces whose
    loss region (region_weights > 0) covers it, mirrored as often as random_transform flips a face: where that side's
    decoder is taught to draw its person. Outside it the loss weighs the target at outside_weight only, and a
    decoder draws what the code says about the input's edges (dark marks where a swapped face's hull reaches past
    the other person's training region); convert_video.py pastes a swap only inside it (models.FaceSwapModel.reach).
    faces: (N, 256, 256, 4) as make_batch takes them; share: model.face_share."""
    covered = np.zeros(faces.shape[1:3])
    for k in range(0, len(faces), 256):  # in chunks: a bool copy of every face at once is 64 kB a face
        covered += (faces[k:k + 256, ..., 3] > 0).sum(0)
    view = align.center_face((covered / max(len(faces), 1)).astype(np.float32), size, share)
    return np.round(255 * ((1 - flip) * view + flip * view[:, ::-1])).astype(np.uint8)


def make_batch(faces, rng, batch_size, size, warp=True, detail=None, share=align.FACE_COVERAGE):
    """(input, target, weights) float tensors of randomly drawn, augmented faces: (B, 3, size, size) twice
    and the target's region weights (B, 1, size, size). `faces` is (N, 256, 256, 4): BGR + region weights.
    warp=False gives the target itself as the input (no random warp; for sharpness late in training).
    detail=(size, count): also the targets of the first `count` faces at that size and their weights, for the
    detail stage (5 tensors). share: the central share of the stored faces the model sees (model.face_share)."""
    idx = rng.integers(len(faces), size=batch_size)
    inputs, targets, bigs = [], [], []
    for k, i in enumerate(idx):
        made = random_warp(faces[i], rng, size, share, transform=random_transform(faces[i].shape[0], rng),
                           detail_size=detail[0] if detail and k < detail[1] else None)
        inputs.append(made[0] if warp else made[1])
        targets.append(made[1])
        bigs += made[2:]
    batch = (tensors.to_tensor(np.stack(inputs)[..., :3]),) + target_tensors(np.stack(targets))
    return batch + target_tensors(np.stack(bigs)) if bigs else batch


def target_tensors(targets):
    """(colour, region weights) tensors of uint8 (B, S, S, 4) targets."""
    weights = torch.from_numpy(targets[..., 3:].transpose(0, 3, 1, 2).astype(np.float32) / WEIGHT_SCALE)
    return tensors.to_tensor(targets[..., :3]), weights


class StepBatches(torch.utils.data.Dataset):
    """Item `step` is that step's batch for both sides: a pure function of (seed, rank, step).

    Steps from `warp_until` on are drawn without the random warp. detail=(size, count): the first `count` faces of
    each side also come as targets at that size (make_batch), for the detail stage."""

    def __init__(self, faces_a, faces_b, batch_size, size, seed, rank=0, warp_until=None, detail=None,
                 share=align.FACE_COVERAGE):
        self.faces = (faces_a, faces_b)
        self.batch_size, self.size, self.seed, self.rank = batch_size, size, seed, rank
        self.warp_until, self.detail, self.share = warp_until, detail, share
        self.previews = (preview_faces(faces_a, size=size, share=share), preview_faces(faces_b, size=size, share=share))

    def __len__(self):
        return 2 ** 62

    def __getitem__(self, step):
        warp = self.warp_until is None or step < self.warp_until
        return tuple(make_batch(faces, np.random.default_rng([self.seed, self.rank, step, side]), self.batch_size,
                                self.size, warp, self.detail, self.share) for side, faces in enumerate(self.faces))


def _worker_init(_):
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    # Ctrl-C and SIGTERM to the whole process group (a terminal, a scheduler's time limit) are the main process's to
    # handle (StopSignals: it saves, then the loader stops its workers); a worker that died of one would leave the
    # main process waiting on a batch that never comes, or make the loader raise instead
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def batch_loader(dataset, start_step, workers):
    if workers:
        # OpenCV's thread pool does not survive fork: a worker forked while the pool's threads sleep hangs
        # for ever in _worker_init's setNumThreads. One thread here stops the pool; train() restores it.
        cv2.setNumThreads(1)
    return torch.utils.data.DataLoader(
        dataset, batch_size=None, sampler=range(start_step, 2 ** 62), num_workers=workers,
        worker_init_fn=_worker_init, prefetch_factor=2 if workers else None)


# ---------------------------------------------------------------- model and loss


class BothSides(nn.Module):
    """Training view of the model, one module for DDP: (x_a, x_b, swaps) -> models.FaceSwapModel.forward_training."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x_a, x_b, swaps=False, detail=0):
        """forward_training's outputs, and with detail > 0 the first `detail` faces of each decoder (detached: the
        detail stages learn from the decoders, not the other way) through each side's detail stage."""
        out_a, out_b, codes, swapped = self.model.forward_training(x_a, x_b, swaps)
        drawn = None if not detail else [self.model.enlarge(out[:detail, :3].detach(), side)
                                         for out, side in ((out_a, "a"), (out_b, "b"))]
        return out_a, out_b, codes, swapped, drawn


def reconstruction_loss(kind, outside_weight=0.05, edges=0.0):
    """loss(output, target, weights) of one side. output may carry a mask as a 4th channel.

    l1: the tutorial's L1 on the whole square. ssim+l1: plus DSSIM. masked: DeepFaceLab's
    10 x DSSIM + 10 x MSE inside the face mask (SAEHD), the MSE weighted x3 around the eyes and
    x2 around the mouth (faceswap), `outside_weight` outside the face, plus `edges` x the L1 of the
    image gradients' difference weighted the same way (0: none); a learned mask is trained on the face mask."""
    def l1(y, t, w):
        return F.l1_loss(y[:, :3], t)

    def ssim_l1(y, t, w):
        return F.l1_loss(y[:, :3], t) + (1 - tensors.ssim(y[:, :3], t)) / 2

    def masked(y, t, w):
        mask = (w > 0).float()
        weights = torch.where(w > 0, w, torch.full_like(w, outside_weight))
        mse = (weights * (y[:, :3] - t) ** 2).mean() / weights.mean()
        dssim = (1 - tensors.ssim(y[:, :3] * mask, t * mask)) / 2
        loss = 10 * dssim + 10 * mse
        if edges:  # the gradient difference loss (Mathieu et al. 2016): a blurred edge costs what it loses
            for d in (-1, -2):  # across and down; a difference weighs what the lesser of its two pixels does
                n = weights.shape[d] - 1
                wd = torch.minimum(weights.narrow(d, 0, n), weights.narrow(d, 1, n))
                loss = loss + edges * (wd * (y[:, :3].diff(dim=d) - t.diff(dim=d)).abs()).mean() / wd.mean()
        if y.shape[1] == 4:
            loss = loss + F.mse_loss(y[:, 3:], mask)
        return loss

    return {"l1": l1, "ssim+l1": ssim_l1, "masked": masked}[kind]


def to_device(t, device):
    return t.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)


# ---------------------------------------------------------------- checkpoints


def checkpoint_state(model, optimizer, step, best_loss, seed, identities=None, adversaries=None, reach=None):
    """What a checkpoint holds: weights, optimizer, step and the model's config (convert_video.py needs only
    that), A's and B's face-recognition identity (convert_video.py tells the person apart with it), where each
    decoder was taught to draw (region_reach of each side's faces, {"a": uint8 (S, S), "b": ...}; convert_video.py
    pastes only there), and the critics of --gan/--likeness with their optimizer, if any."""
    return dict(model=model.state_dict(), optimizer=optimizer.state_dict(), step=step, config=model.config,
                best_loss=best_loss, seed=seed, identities=identities,
                **({"reach": {side: torch.from_numpy(r.copy()) for side, r in reach.items()}} if reach else {}),
                **(adversaries.state() if adversaries is not None else {}))


def mean_loss_improved(window, best_loss):
    """(new best loss, whether the mean of the losses since the last save beats it); empties the window."""
    mean = float(np.mean(window)) if window else math.inf
    window.clear()
    return min(best_loss, mean), mean < best_loss


# ---------------------------------------------------------------- preview


def preview_faces(faces, count=6, size=64, share=align.FACE_COVERAGE):
    """A fixed, evenly spread set of un-augmented faces (model view) for previews."""
    idx = np.linspace(0, len(faces) - 1, min(count, len(faces))).round().astype(int)
    return tensors.to_tensor(np.stack([align.center_face(faces[i, ..., :3], size, share) for i in idx]))


@torch.no_grad()
def save_preview(path, model, previews, device):
    """Rows: A, A->A, A->B, B, B->B, B->A of the faces `previews` (preview_faces of A and of B); written
    atomically."""
    import torchvision

    was_training = model.training
    model.eval()
    rows = []
    view_a, view_b = previews
    for x, own, other in ((view_a, "a", "b"), (view_b, "b", "a")):
        x = x.to(device)
        rows += [x, model(x, own)[:, :3].float(), model(x, other)[:, :3].float()]
    model.train(was_training)
    grid = torchvision.utils.make_grid(torch.cat(rows).cpu(), nrow=len(view_a), padding=2)
    buffer = io.BytesIO()
    torchvision.utils.save_image(grid, buffer, format="png")
    utils.write_bytes_atomic(path, buffer.getvalue())


# ---------------------------------------------------------------- distributed


def setup_distributed(device_name):
    """(rank, world_size, device); starts the process group when run under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, utils.pick_device(device_name)
    use_cuda = torch.cuda.is_available() and device_name != "cpu"
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank = dist.get_rank()
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def any_rank(flag, world):
    """True on every rank when `flag` is true on any rank (so all ranks stop together)."""
    if world == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(t)
    return bool(t.item() > 0)


# ---------------------------------------------------------------- training


def train_step(net, optimizer, batch, loss_fn, device, dtype, scaler, adversaries=None):
    """One step on both sides; returns (loss_a, loss_b) as floats. With `adversaries` (Adversaries) their terms
    join the loss, and then the critics take their own step."""
    side_a, side_b = [[to_device(t, device) for t in side] for side in batch]
    (input_a, target_a, weights_a), (input_b, target_b, weights_b) = side_a[:3], side_b[:3]
    detail = len(side_a[3]) if len(side_a) > 3 else 0  # targets at the detail stages' size for the first faces
    swapped = adversaries is not None and adversaries.gan_on and adversaries.swaps and not detail  # drawn as the other
    with utils.autocast(device, dtype):
        out_a, out_b, codes, swaps, drawn = net(input_a, input_b, swapped, detail)
    loss_a, loss_b = loss_fn(out_a.float(), target_a, weights_a), loss_fn(out_b.float(), target_b, weights_b)
    if drawn is not None:  # each person's detail stage learns their real faces at its size (part of their loss)
        loss_a = loss_a + loss_fn(drawn[0].float(), side_a[3], side_a[4])
        loss_b = loss_b + loss_fn(drawn[1].float(), side_b[3], side_b[4])
    total = loss_a + loss_b
    if adversaries is not None:  # judged: the decoders' faces, or with detail stages theirs, at their size
        judged, real, weights = (((out_a, out_b), (target_a, target_b), (weights_a, weights_b)) if drawn is None
                                 else (drawn, (side_a[3], side_b[3]), (side_a[4], side_b[4])))
        masks = [(w > 0).float() for w in weights]
        with utils.autocast(device, dtype):
            total = total + adversaries.generator_loss(judged, swaps, codes, masks)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(total).backward()
    scaler.step(optimizer)
    scaler.update()
    if adversaries is not None:
        adversaries.critic_step(real, masks, device, dtype)
    return loss_a.item(), loss_b.item()


# ---------------------------------------------------------------- adversarial losses (--gan, --likeness)


class Adversaries:
    """The critics beside the autoencoder (models.Critics), their optimizer, and the losses they give.

    Each step, generator_loss gives the autoencoder's adversarial terms: its faces judged by each person's patch
    discriminator (--gan, while gan_on), its codes by the code discriminator (--likeness); then critic_step
    trains the critics on the same step's real faces and on the faces and codes just made (detached)."""

    def __init__(self, critics, optimizer, gan, likeness, swaps, world, device, dtype):
        self.critics, self.optimizer, self.gan, self.likeness, self.swaps = critics, optimizer, gan, likeness, swaps
        self.net = critics if world == 1 else nn.parallel.DistributedDataParallel(
            critics, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)
        self.scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
        self.gan_on = False
        self.made = None                       # this step's faces and codes, detached, for critic_step
        self.losses = (math.nan, math.nan)     # the last step's adversarial term and critics' loss

    @property
    def active(self):
        return self.gan > 0 or self.likeness > 0

    def generator_loss(self, outputs, swaps, codes, masks):
        """The autoencoder's adversarial terms: each side's faces (`outputs`: its person's, and with `swaps` the
        other person's drawn as its person) are to pass as real, and A's codes as B's and B's as A's."""
        self.critics.requires_grad_(False)  # gradients go to the autoencoder only
        loss, faces = torch.zeros((), device=codes.device), None
        if self.likeness:
            loss = loss + self.likeness * bce(self.critics.code(codes), 1 - code_labels(codes))
        if self.gan_on:
            faces = [out[:, :3] * m for out, m in zip(outputs, masks)]
            if swaps is not None:
                a_as_b, b_as_a = swaps
                faces = [torch.cat([faces[0], b_as_a[:, :3] * masks[1]]),
                         torch.cat([faces[1], a_as_b[:, :3] * masks[0]])]
            for side, drawn in zip("ab", faces):
                loss = loss + self.gan * bce(self.critics.faces(side)(drawn), 1.0)
        self.critics.requires_grad_(True)
        self.made = (None if faces is None else [f.detach() for f in faces], codes.detach())
        self.losses = (loss.item(), math.nan)
        return loss

    def critic_step(self, targets, masks, device, dtype):
        """One step of the critics: real faces (the step's targets in their masks) against the faces made."""
        faces, codes = self.made
        if faces is None and not self.likeness:
            return  # nothing judged this step (before the end with --gan)
        real = [t * m for t, m in zip(targets, masks)]
        with utils.autocast(device, dtype):
            both = None if faces is None else [torch.cat([r, f]) for r, f in zip(real, faces)]
            logits_a, logits_b, logits_code = self.net(*(both or (None, None)), codes if self.likeness else None)
        loss = torch.zeros((), device=codes.device)
        if logits_code is not None:
            loss = loss + bce(logits_code, code_labels(codes))
        for logits, r in ((logits_a, real[0]), (logits_b, real[1])):
            if logits is not None:  # the first len(r) are real
                loss = loss + bce(logits[:len(r)], 1.0) + bce(logits[len(r):], 0.0)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.losses = (self.losses[0], loss.item())

    def state(self):
        return dict(critics=self.critics.state_dict(), critics_optimizer=self.optimizer.state_dict())


def bce(logits, target):
    """Binary cross-entropy of logits against a label (a float, or a tensor of labels)."""
    logits = logits.float()
    target = torch.full_like(logits, target) if isinstance(target, float) else target.to(logits).expand_as(logits)
    return F.binary_cross_entropy_with_logits(logits, target)


def code_labels(codes):
    """The code discriminator's labels of a batch of codes (A's then B's, as many of each): 0 for A, 1 for B."""
    n = len(codes) // 2
    return torch.cat([torch.zeros(n, 1), torch.ones(len(codes) - n, 1)]).to(codes.device)


def make_adversaries(args, model, saved, world, device, dtype):
    """Adversaries for --gan/--likeness, with a resumed checkpoint's critics (`saved`: its dict) if it has them; None
    when neither is asked for and the checkpoint has none. Critics a checkpoint has are kept (and saved again)
    even by a run that does not use them."""
    if not (args.gan or args.likeness or saved.get("critics")):
        return None
    critics = models.build_critics(model.config).to(device)
    optimizer = make_optimizer(critics, args.lr)
    if saved.get("critics"):
        critics.load_state_dict(saved["critics"])
        optimizer.load_state_dict(saved["critics_optimizer"])
    return Adversaries(critics, optimizer, args.gan, args.likeness, args.gan_swaps, world, device, dtype)


def make_optimizer(model, lr):
    # One optimizer over all parameters: the tutorial's two optimizers both stepped the encoder.
    # The fused kernel is much faster than the default on the CPU.
    try:
        return torch.optim.Adam(model.parameters(), lr=lr, betas=(0.5, 0.999), fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(model.parameters(), lr=lr, betas=(0.5, 0.999))


def prepare(args, device, quiet):
    """(model, optimizer, step, best loss, identities, checkpoint): a new model (identities None, checkpoint {}), or
    the checkpoint's state when one exists (resume)."""
    ckpt_path = args.model_dir / models.CHECKPOINT
    if not ckpt_path.exists():
        if args.freeze_encoder and not args.init:
            raise utils.UserError("--freeze-encoder keeps a pretrained encoder: give the base with --init")
        torch.manual_seed(args.seed)
        model = models.build_model(dict(models.model_config(args.model), coverage=args.coverage))
        if args.init:
            init_from(model, args.init, quiet, args.init_parts)
        model.to(device).to(memory_format=torch.channels_last)
        return model, make_optimizer(model, args.lr), 0, math.inf, None, {}
    if args.init and not quiet:
        print(f"note: {ckpt_path} exists, so training resumes from it and --init is not used")
    ckpt = models.load_checkpoint(ckpt_path)
    if ckpt["config"].get("name") != args.model:
        raise utils.UserError(f"{ckpt_path} holds a {ckpt['config'].get('name')!r} model, not {args.model!r}; "
                              "pass --model to match or use another --model-dir")
    model = models.model_from_checkpoint(ckpt).to(device).to(memory_format=torch.channels_last)
    if model.coverage != args.coverage:  # the model's config says it (models.py's default for older checkpoints)
        raise utils.UserError(f"{ckpt_path} was trained with --coverage {model.coverage:g}, not {args.coverage:g}; "
                              "pass that --coverage or use another --model-dir")
    optimizer = make_optimizer(model, args.lr)
    optimizer.load_state_dict(ckpt["optimizer"])  # the loop sets this run's learning rate at every step
    if not quiet:
        print(f"resuming at step {ckpt['step']}")
    return model, optimizer, ckpt["step"], ckpt.get("best_loss", math.inf), ckpt.get("identities"), ckpt


def init_from(model, path, quiet, parts="all"):
    """Copy a pretrained base's weights (all, or the encoder's) into a new model of the same preset. A model with
    detail stages may start from the same preset without them: its stages start as the plain enlargement."""
    base = models.load_checkpoint(path)
    mine = {k: v for k, v in model.config.items() if k != "name"}
    theirs = {k: v for k, v in models.build_model(base["config"]).config.items() if k != "name"}
    new_stages = theirs["detail_scale"] == 1 < mine["detail_scale"]  # the base has no detail stages, this model has
    if new_stages:
        theirs["detail_scale"] = mine["detail_scale"]
    if mine != theirs:
        differ = ", ".join(f"{k} {theirs.get(k)} (here {mine.get(k)})" for k in sorted(set(mine) | set(theirs))
                           if mine.get(k) != theirs.get(k))
        raise utils.UserError(f"--init {path} holds a {base['config'].get('name')!r} model with {differ}; pass its "
                              "--model and --coverage")
    weights = {k: v.float() for k, v in base["model"].items()}
    if parts == "encoder":
        model.encoder.load_state_dict({k[len("encoder."):]: v for k, v in weights.items() if k.startswith("encoder.")})
    else:
        missing, unexpected = model.load_state_dict(weights, strict=not new_stages)
        assert not unexpected and all(k.startswith(("detail_a.", "detail_b.")) for k in missing), (missing, unexpected)
    if not quiet:
        print(f"starting from the {'encoder' if parts == 'encoder' else 'weights'} of {path} (step {base['step']})"
              + ("; the detail stages start as the plain enlargement" if new_stages else ""))


def load_training_faces(folders, quiet):
    """(N, 256, 256, 4) uint8: each face's BGR and the loss's region weights (from its landmarks)."""
    faces, landmarks = records.load_faces(folders, quiet=quiet)
    weights = np.stack([region_weights(points) for points in landmarks])
    return np.concatenate([faces, weights[..., None]], axis=-1)


def person_identity(folders):
    """A person's face-recognition identity for the checkpoint (convert_video.py tells the person apart with it):
    the mean of the embeddings crop_face.py stored for their faces."""
    return faces.person_embedding(folders).round(5).tolist()


def load_both_sides(args, main_rank, known=None):
    """Faces of A and B, and their identities ({"a": embedding, "b": embedding}; None for a base). `known`: the
    identities of the checkpoint being resumed, kept as they are."""
    quiet = not main_rank
    faces_a, faces_b = (load_training_faces(folders, quiet) for folders in (args.faces_a, args.faces_b))
    if args.pretrain:  # a base: both decoders see everyone
        faces_a = faces_b = np.concatenate([faces_a, faces_b])
        known = None
    elif main_rank and not (known and all(v is not None for v in known.values())):
        known = dict(a=person_identity(args.faces_a), b=person_identity(args.faces_b))
    for name, side in (("A", faces_a), ("B", faces_b)):
        if len(side) < MIN_FACES_WARNING and not quiet:
            print(f"warning: only {len(side)} faces of person {name}; a few hundred or more per side "
                  "give a much better swap")
    return faces_a, faces_b, known


def end_start(args, share, start_step):
    """The step where the last `share` of the run (of --iterations) begins, e.g. the end without random warp; a
    share of 1 or more: this run's first step. None for a share of 0, and with --minutes alone (the switch is then
    made on the clock, in the loop)."""
    if share <= 0 or not args.iterations:
        return None
    return max(start_step if share >= 1 else 0, round((1 - share) * args.iterations))


def cut_log(path, step):
    """Drop log.csv rows past the checkpoint being resumed (a killed run logged steps it never saved)."""
    if not path.exists():
        return
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    kept = rows[:1] + [r for r in rows[1:] if r and r[0].isdigit() and int(r[0]) <= step]
    if len(kept) < len(rows):
        buffer = io.StringIO()
        csv.writer(buffer).writerows(kept)
        utils.write_bytes_atomic(path, buffer.getvalue().encode())


def learning_rate(args, step, tail=None):
    """--lr after the warm-up; over `tail` (the first and last step of the end without warp) it falls linearly
    to --lr-final of it."""
    lr = args.lr * min(1.0, (step + 1) / args.warmup) if args.warmup else args.lr
    if tail is None or step < tail[0]:
        return lr
    done = min(1.0, (step + 1 - tail[0]) / max(1, tail[1] - tail[0]))  # --lr-final at the last step
    return lr * (1 - (1 - args.lr_final) * done)


def decay_tail(args, warp_from, run_start):
    """The steps over which the learning rate falls to --lr-final: from `warp_from` (where the warp stops) to
    --iterations, or with --minutes alone, for the share of this run's steps that --no-warp-last gives the
    end (the steps made before it stand for the rest), the same on every rank. None: no decay."""
    if warp_from is None or args.lr_final == 1:
        return None
    if args.iterations:
        return warp_from, args.iterations
    if args.no_warp_last >= 1:
        return None  # the whole run without warp, its length unknown
    return warp_from, warp_from + round((warp_from - run_start) * args.no_warp_last / (1 - args.no_warp_last))


# ---------------------------------------------------------------- the schedule, the log and the progress bar


class Schedule:
    """Where this run stands in its recipe: each step's learning rate, where the end without warp and the
    adversarial end begin (from --iterations; with --minutes alone they are switched on the clock, at the same
    step on every rank), and when to stop."""

    def __init__(self, args, step, world):
        self.args, self.world, self.run_start, self.start_time = args, world, step, time.time()
        self.warp_from = end_start(args, args.no_warp_last, step)
        self.gan_from = end_start(args, args.gan_last, step) if args.gan else None
        self.tail = decay_tail(args, self.warp_from, step)

    def lr(self, step):
        return learning_rate(self.args, step, self.tail)

    def gan_on(self, step):
        return self.gan_from is not None and step >= self.gan_from

    def elapsed(self):
        return time.time() - self.start_time

    def check(self, step):
        """(done, out of time, whether the warp stops from this step): every rank takes part in these checks each
        step, so all switch and stop at the same step."""
        args, elapsed = self.args, self.elapsed()
        done = bool(args.iterations) and step >= args.iterations
        out_of_time = any_rank(bool(args.minutes) and elapsed >= args.minutes * 60, self.world)
        warp_stops = (self.warp_from is None and args.minutes and args.no_warp_last > 0
                      and any_rank(elapsed >= (1 - args.no_warp_last) * args.minutes * 60, self.world))
        if warp_stops:  # the rest of this run without random warp
            self.warp_from, self.tail = step, decay_tail(args, step, self.run_start)
        if (self.gan_from is None and args.minutes and args.gan and args.gan_last > 0
                and any_rank(elapsed >= (1 - args.gan_last) * args.minutes * 60, self.world)):
            self.gan_from = step  # the rest of this run with the adversarial loss
        return done, out_of_time, warp_stops


class TrainLog:
    """log.csv: a row every --log-every steps (losses, samples/s, elapsed seconds, the adversarial term and the
    critics' loss), and loss.png drawn from it. Rows past the checkpoint being resumed (a killed run logged steps
    it never saved) are dropped first."""

    HEADER = ["step", "loss_a", "loss_b", "samples_per_s", "elapsed_s", "adversarial", "critics"]

    def __init__(self, model_dir, step, samples_per_step):
        self.path, self.plot_path = model_dir / "log.csv", model_dir / "loss.png"
        cut_log(self.path, step)
        new = not self.path.exists()
        self.file = open(self.path, "a", newline="")
        self.writer = csv.writer(self.file)
        if new:
            self.writer.writerow(self.HEADER)
        self.samples, self.tick, self.tick_step = samples_per_step, time.time(), step

    def row(self, step, loss_a, loss_b, elapsed, adversaries):
        """Log a step; returns samples/s since the last row."""
        rate = (step - self.tick_step) * self.samples / max(1e-9, time.time() - self.tick)
        self.tick, self.tick_step = time.time(), step
        adversarial = adversaries.losses if adversaries is not None else (math.nan, math.nan)
        self.writer.writerow([step, f"{loss_a:.6f}", f"{loss_b:.6f}", f"{rate:.2f}", f"{elapsed:.1f}",
                              *(f"{v:.6f}" if math.isfinite(v) else "" for v in adversarial)])
        self.file.flush()
        return rate

    def plot(self):
        utils.write_image(self.plot_path, loss_plot(self.path))

    def close(self):
        self.file.close()


def loss_plot(log_path, width=720, height=360):
    """A chart of log.csv's losses over the steps (A and B), as a BGR image."""
    with open(log_path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("loss_a") and r.get("loss_b")]
    image = np.full((height, width, 3), 255, np.uint8)
    left, right, top, bottom = 60, width - 20, 30, height - 40
    cv2.rectangle(image, (left, top), (right, bottom), (200, 200, 200), 1)
    if len(rows) >= 2:
        steps = np.array([float(r["step"]) for r in rows])
        losses = np.array([[float(r["loss_a"]), float(r["loss_b"])] for r in rows])
        low, high = losses.min(), np.percentile(losses, 98) + 1e-9  # the first steps' high losses clipped
        x = left + (steps - steps[0]) / max(steps[-1] - steps[0], 1) * (right - left)
        for k, colour in ((0, (200, 90, 30)), (1, (30, 120, 230))):
            y = bottom - (np.clip(losses[:, k], low, high) - low) / (high - low) * (bottom - top)
            cv2.polylines(image, [np.stack([x, y], 1).round().astype(np.int32)], False, colour, 1, cv2.LINE_AA)
        for value, y in ((high, top), (low, bottom)):
            cv2.putText(image, f"{value:.3g}", (5, y + 4), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
        cv2.putText(image, f"step {steps[0]:.0f}", (left, height - 15), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1)
        cv2.putText(image, f"step {steps[-1]:.0f}", (right - 80, height - 15), cv2.FONT_HERSHEY_SIMPLEX, 0.4,
                    (0, 0, 0), 1)
    cv2.putText(image, "loss A", (left + 10, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (200, 90, 30), 1, cv2.LINE_AA)
    cv2.putText(image, "loss B", (left + 90, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (30, 120, 230), 1, cv2.LINE_AA)
    return image


def progress_bar(args, step, quiet):
    """Counts to the run's real stop: the clock with --minutes, else the steps to --iterations."""
    if args.minutes:
        return tqdm(total=round(args.minutes * 60), unit="s", desc="training (minutes)", disable=quiet,
                    dynamic_ncols=True,
                    bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} s [{elapsed}<{remaining}{postfix}]")
    return tqdm(total=args.iterations or None, initial=step, unit="step", desc="training", disable=quiet,
                dynamic_ncols=True)


def show_progress(bar, args, step, schedule, losses, rate=None):
    if args.minutes:
        bar.update(min(bar.total, int(schedule.elapsed())) - bar.n)
    else:
        bar.update(1)
    if rate is not None:
        bar.set_postfix(step=step, loss_a=f"{losses[0]:.4f}", loss_b=f"{losses[1]:.4f}", samples_s=f"{rate:.1f}")


# ---------------------------------------------------------------- the run


@dataclasses.dataclass
class Parts:
    """What training steps and checkpoints need, made once per run."""
    model: nn.Module
    net: nn.Module          # the model's training view (BothSides; DDP-wrapped under torchrun)
    optimizer: torch.optim.Optimizer
    adversaries: object     # Adversaries, or None
    loss_fn: object
    device: torch.device
    dtype: object           # autocast dtype, or None for fp32
    identities: dict
    seed: int
    reach: dict = None      # region_reach of each side's faces

    def __post_init__(self):
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)

    def step(self, batch, lr, gan_on):
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        adversaries = self.adversaries if self.adversaries is not None and self.adversaries.active else None
        if adversaries is not None:
            adversaries.gan_on = gan_on
        return train_step(self.net, self.optimizer, batch, self.loss_fn, self.device, self.dtype, self.scaler,
                          adversaries)

    def save(self, model_dir, step, best_loss, is_best):
        models.save_checkpoint(model_dir, checkpoint_state(self.model, self.optimizer, step, best_loss, self.seed,
                                                           self.identities, self.adversaries, self.reach), is_best)


def run(args):
    rank, world, device = setup_distributed(args.device)
    if rank != 0:
        return train(args, rank, world, device)
    utils.print_settings(args, "train.py")
    with utils.locked(utils.ensure_writable_dir(args.model_dir)):  # and stale temp files of a killed run go
        return train(args, rank, world, device)


def train(args, rank, world, device):
    main_rank = rank == 0
    model, optimizer, step, best_loss, identities, saved = prepare(args, device, quiet=not main_rank)
    model.encoder.requires_grad_(not args.freeze_encoder)  # frozen: Adam skips it, autograd stops at its output
    if args.iterations and step >= args.iterations:
        if main_rank:
            print(f"already at step {step} >= --iterations {args.iterations}; nothing to do")
        return 0
    faces_a, faces_b, identities = load_both_sides(args, main_rank, identities)
    dtype = utils.pick_precision(args.precision, device)
    net = BothSides(model)
    if world > 1:
        net = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    parts = Parts(model, net, optimizer, make_adversaries(args, model, saved, world, device, dtype),
                  reconstruction_loss(args.loss, edges=args.edges), device, dtype, identities, args.seed,
                  {side: region_reach(f, model.output_size, model.face_share)
                   for side, f in (("a", faces_a), ("b", faces_b))} if main_rank else None)
    schedule = Schedule(args, step, world)
    dataset = StepBatches(faces_a, faces_b, args.batch_size, model.input_size, args.seed, rank, schedule.warp_from,
                          detail=(model.output_size, max(1, round(args.batch_size * DETAIL_SHARE)))
                          if model.output_size > model.input_size else None, share=model.face_share)
    if main_rank:
        announce(args, model, device, dtype, world, (len(faces_a), len(faces_b)), step)
    with StopSignals() as signals:
        step, stop_reason, code = loop(args, parts, dataset, schedule, step, best_loss, main_rank, signals)
    if main_rank:
        save_preview(args.model_dir / "preview.png", model, dataset.previews, device)
        print(f"stopped at step {step}: {stop_reason}; checkpoint saved to {args.model_dir / models.CHECKPOINT}, "
              f"preview {args.model_dir / 'preview.png'}")
    if world > 1:  # every rank leaves together, once rank 0 is done: a rank that tears its process group down while
        dist.barrier()  # another still works could abort (gloo: "terminate called without an active exception")
    # saved, but not done: 130 as for any Ctrl-C (143 for SIGTERM, as the shell reports a process it ended), so
    # that `train.py && convert_video.py`, demo.py and the benchmarks stop instead of going on with a half-trained
    # model
    return code


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the training loop is, so that it is handled as Ctrl-C: save, then stop."""


class StopSignals:
    """While training, Ctrl-C (SIGINT) raises KeyboardInterrupt and SIGTERM (kill, a scheduler's time limit, docker
    stop) raises Terminated in this process (batch workers ignore both: _worker_init) -- except inside
    `held()`, around the receipt of a batch: a worker hands a batch over through a handshake on a socket, and a stop
    in the middle of it makes the worker print a traceback. A signal there is held until the batch is in; a second
    one while held stops at once (a loader that hangs can still be stopped)."""

    def __init__(self):
        self.holding, self.pending, self.previous = False, None, {}

    def handler(self, signum, frame):
        if self.holding and self.pending is None:
            self.pending = signum
            return
        self.raise_for(signum)

    @staticmethod
    def raise_for(signum):
        if signum == signal.SIGTERM:
            signal.signal(signum, signal.SIG_IGN)  # once: a second SIGTERM does not cut the save short
            raise Terminated
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def held(self):
        self.holding = True
        try:
            yield
        finally:
            self.holding, pending, self.pending = False, self.pending, None
            if pending is not None:
                self.raise_for(pending)

    def __enter__(self):
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                self.previous[signum] = signal.signal(signum, self.handler)
            except ValueError:  # not the main thread (train.main called from one): signals stay as they were
                break
        return self

    def __exit__(self, *exc):
        for signum, previous in self.previous.items():
            signal.signal(signum, previous)


def announce(args, model, device, dtype, world, counts, step):
    """What this run trains, on what, and the settings it was started with (train_settings.json)."""
    print(f"model {model.config['name']}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, "
          f"device {device}, precision {str(dtype).replace('torch.', '') if dtype else 'fp32'}, "
          f"{world} process(es) x {args.batch_size} faces per side; faces A {counts[0]}, B {counts[1]}")
    if not step and not args.init:
        print("starting from scratch")
    utils.write_json(args.model_dir / "train_settings.json",
                     dict(utils.settings_dict(args), world_size=world, start_step=step))


def loop(args, parts, dataset, schedule, step, best_loss, main_rank, signals):
    """Train until --iterations, --minutes, Ctrl-C or SIGTERM, saving every --save-every steps and at the stop:
    (the step reached, why it stopped, the exit code: 0, or 130 for Ctrl-C and 143 for SIGTERM)."""
    log = TrainLog(args.model_dir, step, 2 * args.batch_size * schedule.world) if main_rank else None
    bar, window, saved_step = progress_bar(args, step, not main_rank), [], step
    cv2_threads = cv2.getNumThreads()  # batch_loader may set one; put back at the end (this process may convert next)
    try:
        batches = iter(batch_loader(dataset, step, args.workers))
        while True:
            with signals.held():
                batch = next(batches)
            losses = checked_step(args, parts, batch, schedule, step, saved_step)
            step += 1
            window.append(sum(losses))
            rate = log.row(step, *losses, schedule.elapsed(), parts.adversaries) if log and (
                step % args.log_every == 0 or step == 1) else None
            show_progress(bar, args, step, schedule, losses, rate)
            if log and step % args.preview_every == 0:
                save_preview(args.model_dir / "preview.png", parts.model, dataset.previews, parts.device)
                log.plot()
            done, out_of_time, warp_stops = schedule.check(step)
            if warp_stops:
                dataset.warp_until = step
                batches = iter(batch_loader(dataset, step, args.workers))
            if step % args.save_every == 0 or done or out_of_time:
                best_loss, saved_step = save(args, parts, step, window, best_loss, main_rank), step
            if done or out_of_time:
                return step, "iterations reached" if done else f"{args.minutes:g} minutes reached", 0
    except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM (Terminated)
        save(args, parts, step, window, best_loss, main_rank)
        if isinstance(stop, Terminated):
            return step, "stopped (SIGTERM)", 128 + signal.SIGTERM
        return step, "interrupted (Ctrl-C)", 130
    finally:
        bar.close()
        cv2.setNumThreads(cv2_threads)
        if log:
            log.plot()
            log.close()


def checked_step(args, parts, batch, schedule, step, saved_step):
    """(loss_a, loss_b) of one training step, or a UserError for running out of memory or a loss gone NaN."""
    try:
        loss_a, loss_b = parts.step(batch, schedule.lr(step), schedule.gan_on(step))
    except torch.OutOfMemoryError:
        raise utils.UserError(f"out of memory at batch size {args.batch_size}; "
                              f"try --batch-size {max(1, args.batch_size // 2)}") from None
    if not (math.isfinite(loss_a) and math.isfinite(loss_b)):
        raise utils.UserError(f"loss became NaN/inf at step {step + 1}; the last good checkpoint (step {saved_step}) "
                              f"is kept in {args.model_dir}. Try --precision fp32 or a lower --lr")
    return loss_a, loss_b


def save(args, parts, step, window, best_loss, main_rank):
    """Save the checkpoint (and the best-loss copy when the losses since the last save beat it); the best loss."""
    best_loss, is_best = mean_loss_improved(window, best_loss)
    if main_rank:
        parts.save(args.model_dir, step, best_loss, is_best)
    return best_loss


def main(argv=None):
    # No TF32 matrix products on GPUs (PyTorch's default): the masked loss's SSIM blurs by matrix products, and its
    # variances, E[x^2] - E[x]^2, cancel; at TF32's 10-bit mantissa its gradient goes wrong (docs/SPEED.md). The
    # models run in bf16 there anyway; convolutions keep TF32.
    try:
        return utils.main(parse_args, run, argv)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    raise SystemExit(main())
