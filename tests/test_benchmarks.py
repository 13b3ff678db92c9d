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
