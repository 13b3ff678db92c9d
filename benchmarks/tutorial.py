"""The tutorial's training loop, faithfully: the benchmarks' baseline.

The original model; two Adam optimizers, one over the encoder and decoder A, one over the encoder and
decoder B (so the encoder is stepped twice a step); lr 5e-5, betas (0.5, 0.999); fp32, NCHW; L1 on the
whole square; batches augmented inline with train.py's random warp, 64 faces per side.
"""
import time

import numpy as np
import torch
import torch.nn.functional as F

import common  # noqa: F401  (puts the repository on sys.path)

import models
import train

BATCH_SIZE = 64


def steps(faces_a, faces_b, batch_size=BATCH_SIZE, seed=0, resume=None):
    """Yield after every step a dict: model, optimizers, step, loss_a, loss_b, seconds.

    faces_a/faces_b as train.load_training_faces gives them. resume: a checkpoint() to go on from; the
    batches that follow are those of one unbroken run."""
    torch.manual_seed(seed)
    model = models.build_model(models.model_config("original"))
    opt_a = torch.optim.Adam([*model.encoder.parameters(), *model.decoder_a.parameters()], lr=5e-5,
                             betas=(0.5, 0.999))
    opt_b = torch.optim.Adam([*model.encoder.parameters(), *model.decoder_b.parameters()], lr=5e-5,
                             betas=(0.5, 0.999))
    step = 0
    if resume is not None:
        model.load_state_dict(resume["model"])
        opt_a.load_state_dict(resume["optimizer"]["a"])
        opt_b.load_state_dict(resume["optimizer"]["b"])
        step = resume["step"]
    while True:
        t = time.perf_counter()
        warped_a, target_a, _ = train.make_batch(faces_a, np.random.default_rng([seed, 0, step, 0]), batch_size, 64)
        warped_b, target_b, _ = train.make_batch(faces_b, np.random.default_rng([seed, 0, step, 1]), batch_size, 64)
        opt_a.zero_grad()
        opt_b.zero_grad()
        loss_a = F.l1_loss(model(warped_a, "a"), target_a)
        loss_b = F.l1_loss(model(warped_b, "b"), target_b)
        loss_a.backward()
        loss_b.backward()
        opt_a.step()
        opt_b.step()
        step += 1
        yield dict(model=model, optimizers=(opt_a, opt_b), step=step, loss_a=loss_a.item(), loss_b=loss_b.item(),
                   seconds=time.perf_counter() - t)


def checkpoint(state):
    """A checkpoint of a steps() state that convert_video.py can use and steps(resume=...) goes on from."""
    opt_a, opt_b = state["optimizers"]
    return dict(model=state["model"].state_dict(), optimizer=dict(a=opt_a.state_dict(), b=opt_b.state_dict()),
                step=state["step"], config=state["model"].config)
