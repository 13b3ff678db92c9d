"""The benchmarks' own machinery, on the committed data: what they measure must be what they say."""
import sys
import threading
import time

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_quality  # noqa: E402

import utils  # noqa: E402


@pytest.mark.slow  # a run of its --calibrate-seconds
def test_calibration_trains_for_the_seconds_asked(obama_faces, reagan_faces, tmp_path, monkeypatch):
    """A recipe's speed is measured over about --calibrate-seconds of training, however long the start-up (loading
    the faces, building the model) takes: sized from the wall time of a first guess, which holds the start-up, the
    measuring run was a fraction of the seconds asked, too short to tell two recipes apart."""
    runs, real = [], bench_quality.train.main

    def timed(argv):
        start = time.time()
        code = real(argv)
        runs.append((int(argv[argv.index("--iterations") + 1]), time.time() - start))
        return code

    monkeypatch.setattr(bench_quality.train, "main", timed)
    faces = {"A": ([obama_faces / "faces"], []), "B": ([reagan_faces / "faces"], [])}
    flags = ["--model", "tiny", "--batch-size", "4", "--precision", "fp32", "--no-warp-last", "0"]
    seconds = 12
    rate = bench_quality.calibrate_phase(flags, faces, tmp_path, seconds, bench_quality.NO_END, workers=0)
    (guess_steps, _), (steps, wall) = runs
    assert guess_steps == bench_quality.CALIBRATE_GUESS
    trained = (steps - guess_steps) * 2 * 4 / rate  # the measuring run's steps beyond the guess, at the measured speed
    assert 0.6 * seconds < trained < 2 * seconds, (steps, rate, trained)
    assert wall > 0.6 * seconds, wall
    assert not (tmp_path / "calibration").exists()  # nothing of it is left


def test_two_runs_on_one_pair_take_turns(tmp_path, monkeypatch, capsys):
    """A second benchmark run on a pair that another is preparing waits for it, then uses its faces (it used to stop
    with crop_face's 'in use by another run')."""
    monkeypatch.setattr(bench_quality, "VIDEOS", tmp_path / "no clips here")  # the faces only: nothing to extract
    data = tmp_path / "hdtf" / "data"
    data.mkdir(parents=True)
    done = []
    second = threading.Thread(target=lambda: done.append(bench_quality.prepare_pair("hdtf", tmp_path)))
    with utils.locked(data):  # the first run, preparing
        second.start()
        second.join(1.0)
        assert second.is_alive() and not done
    second.join(10)
    sides, _ = done[0]
    a = tmp_path / "hdtf" / "data" / "A"
    assert sides["A"][0] == [a / "sadtalker_WDA_AlexandriaOcasioCortez_000" / "train_face"]
    assert "waiting for another run" in capsys.readouterr().out


def test_recipes_that_share_a_trunk_train_the_same_one():
    """Two recipes are given one kept trunk only where the runs that train it are the same run: the same train.py
    flags once the end phases are switched off (NO_END), as train_trunk trains it, but for the flags that act only
    in the end (TAIL_FLAGS, e.g. --lr-final: they share a trunk by design). Recipes that differ in their end's share
    (--no-warp-last 0.2 / 0.4) share it; another seed, learning rate or model does not."""
    faces = {"A": ([ROOT / "a"], []), "B": ([ROOT / "b"], [])}
    named = {name: bench_quality.recipe_flags(name)[1] for name in bench_quality.RECIPES}
    by_key = {}
    for name, flags in named.items():
        if flags != "tutorial" and bench_quality.AFTER not in flags:
            by_key.setdefault(bench_quality.shared_trunk(ROOT, flags, 100), []).append(name)
    for names in by_key.values():
        runs = {tuple(bench_quality.train_flags(bench_quality.trunk_flags(named[n]), faces, ROOT, 100,
                                                bench_quality.NO_END)) for n in names}
        assert len(runs) == 1, names
    key = {name: bench_quality.shared_trunk(ROOT, named[name], 100) for name in named}
    b8 = key["tiny128_cover80_lr5_b8"]
    assert key["tiny128_cover80_lr5_b8_nowarp40"] == key["tiny128_cover80_lr5_b8_nowarp60"] == b8
    assert key["tiny128_cover80_lr5_b8_decay"] == b8  # a flag of the end only (TAIL_FLAGS)
    assert b8 not in (key["tiny128_cover80_lr5_b8_seed1"], key["tiny128_cover80_lr5"], key["tiny128_cover80_lr5_b4"])
    assert key["tiny128_cover80_lr5_b8_nowarp40_seed1"] == key["tiny128_cover80_lr5_b8_seed1"]


@pytest.mark.slow  # two short trainings
def test_a_recipe_starts_from_the_trunk_another_kept(obama_faces, reagan_faces, tmp_path, monkeypatch):
    """A recipe whose trunk another recipe trained to the same step copies it instead of training it again: the
    checkpoint is the one the other recipe would have trained."""
    runs, real = [], bench_quality.train.main
    monkeypatch.setattr(bench_quality.train, "main", lambda argv: runs.append(argv) or real(argv))
    faces = {"A": ([obama_faces / "faces"], []), "B": ([reagan_faces / "faces"], [])}
    base = "--model tiny --loss masked --batch-size 4 --precision fp32 --warmup 2".split()
    on = dict(workers=0)
    bench_quality.train_trunk(base + ["--no-warp-last", "0.2"], faces, tmp_path / "b" / "model", 6, tmp_path, **on)
    bench_quality.train_trunk(base + ["--no-warp-last", "0.6"], faces, tmp_path / "c" / "model", 6, tmp_path, **on)
    assert len(runs) == 1  # the second copied the first's
    theirs = bench_quality.models.load_checkpoint(tmp_path / "b" / "model" / bench_quality.models.CHECKPOINT)
    ours = bench_quality.models.load_checkpoint(tmp_path / "c" / "model" / bench_quality.models.CHECKPOINT)
    assert ours["step"] == 6
    assert all(bench_quality.torch.equal(ours["model"][k], theirs["model"][k]) for k in theirs["model"])
    bench_quality.train_trunk(base + ["--no-warp-last", "0.6", "--seed", "1"], faces, tmp_path / "d" / "model", 6,
                              tmp_path, **on)
    assert len(runs) == 2  # another seed is another trunk
