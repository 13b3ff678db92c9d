"""train.py under torchrun: DDP gradients equal one big batch; a 2-process run resumes in 1 process."""
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as tmp_mp
import torch.nn.functional as F

from conftest import ROOT

import models
import train


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fixed_batch():
    g = torch.Generator().manual_seed(1)
    return [torch.rand(64, 3, 64, 64, generator=g) for _ in range(4)]  # warped a, target a, warped b, target b


def grads_of(net, batch):
    warped_a, target_a, warped_b, target_b = batch
    out_a, out_b = net(warped_a, warped_b)[:2]
    (F.l1_loss(out_a, target_a) + F.l1_loss(out_b, target_b)).backward()
    return {k: p.grad.clone() for k, p in net.named_parameters()}


def ddp_worker(rank, world, port, out_path):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    got_rank, got_world, device = train.setup_distributed("cpu")
    assert (got_rank, got_world, device.type) == (rank, world, "cpu")
    torch.manual_seed(0)
    net = torch.nn.parallel.DistributedDataParallel(train.BothSides(models.build_model(models.model_config("tiny"))))
    half = [t[32 * rank:32 * (rank + 1)] for t in fixed_batch()]
    grads = grads_of(net, half)
    if rank == 0:
        torch.save({k.removeprefix("module."): v for k, v in grads.items()}, out_path)
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_by_32_equals_one_by_64(tmp_path):
    out = tmp_path / "ddp_grads.pt"
    tmp_mp.spawn(ddp_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    torch.manual_seed(0)
    single = grads_of(train.BothSides(models.build_model(models.model_config("tiny"))), fixed_batch())
    ddp = torch.load(out)
    assert single.keys() == ddp.keys()
    for k in single:
        assert torch.allclose(single[k], ddp[k], rtol=1e-4, atol=1e-6), k


@pytest.mark.slow
def test_torchrun_run_saves_on_rank0_and_resumes_in_one_process(obama_faces, reagan_faces, tmp_path):
    model_dir = tmp_path / "model"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), str(ROOT / "train.py"), "--faces-a", str(obama_faces / "faces"), "--faces-b",
           str(reagan_faces / "faces"), "--model-dir", str(model_dir), "--model", "tiny", "--batch-size", "4",
           "--iterations", "3", "--workers", "0", "--precision", "fp32", "--device", "cpu",
           "--gan", "0.1", "--gan-last", "0.5", "--likeness", "0.05"]  # the critics under DDP too
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "2 process(es) x 4 faces per side" in proc.stdout
    ckpt = models.load_checkpoint(model_dir / models.CHECKPOINT)
    assert ckpt["step"] == 3 and not any(k.startswith("module.") for k in ckpt["model"])
    assert ckpt["critics_optimizer"]["state"] and not any(k.startswith("module.") for k in ckpt["critics"])
    assert train.main(["--faces-a", str(obama_faces / "faces"), "--faces-b", str(reagan_faces / "faces"),
                       "--model-dir", str(model_dir), "--model", "tiny", "--batch-size", "4", "--iterations", "5",
                       "--workers", "0", "--precision", "fp32"]) == 0
    assert models.load_checkpoint(model_dir / models.CHECKPOINT)["step"] == 5


def test_ranks_draw_different_samples():
    import numpy as np
    faces = np.random.default_rng(0).integers(0, 255, (50, 256, 256, 3), dtype=np.uint8)
    rank0 = train.StepBatches(faces, faces, 4, 64, seed=0, rank=0)[7]
    rank1 = train.StepBatches(faces, faces, 4, 64, seed=0, rank=1)[7]
    again = train.StepBatches(faces, faces, 4, 64, seed=0, rank=0)[7]
    assert not torch.equal(rank0[0][0], rank1[0][0])
    assert torch.equal(rank0[0][0], again[0][0])
