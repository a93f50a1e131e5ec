"""Interrupted runs, damaged caches and failing sweep jobs: nothing partial looks complete, nothing damaged is
trusted, and a rerun gives the results an uninterrupted run gives."""

import json
import logging
import os

import pytest
import torch
from test_errors import compose_cfg, snnbench_run

from snnbench import pipeline
from snnbench.data import build_splits, loader
from snnbench.models import build_model
from snnbench.report import atomic_write_bytes
from snnbench.train import cached, train

RUN = ("train.epochs=1", "sim.T=8", "sim.num_samples=40", "sim.batch_size=8")
RESULTS = ("accuracy.csv", "layers.csv", "summary.json")

# The real CLI, with simulate() wrapped so that the process sends itself SIGTERM after the first batch:
# an interrupt in the middle of the simulation, at the same point every time.
SIGTERM_DURING_SIMULATION = """
import os, signal
from snnbench import pipeline
from snnbench.cli import main

simulate = pipeline.simulate

def simulate_until_sigterm(*args, progress, **kwargs):
    def progress_then_sigterm(images):
        progress(images)
        os.kill(os.getpid(), signal.SIGTERM)
    return simulate(*args, progress=progress_then_sigterm, **kwargs)

pipeline.simulate = simulate_until_sigterm
main()
"""


def leftovers(folder):
    return sorted(p.name for p in folder.rglob("*") if p.name.endswith((".tmp", ".partial")))


def test_sigterm_during_simulation_then_rerun_resumes_and_matches_an_uninterrupted_run(tmp_path):
    run = tmp_path / "run"
    killed = snnbench_run(tmp_path, *RUN, code=SIGTERM_DURING_SIMULATION)
    assert killed.returncode == 130, killed.stderr
    assert killed.stderr == "error: interrupted: finished stages are cached; rerun the same command to resume\n"
    assert "simulating" in (run / "snnbench.log").read_text()
    assert not [name for name in RESULTS if (run / name).exists()]
    assert leftovers(tmp_path) == []
    assert json.loads((run / "error.json").read_text())["type"] == "KeyboardInterrupt"

    rerun = snnbench_run(tmp_path, *RUN)
    assert rerun.returncode == 0, rerun.stderr
    assert "using cached ANN" in rerun.stdout and "using cached calibration" in rerun.stdout
    assert "training ANN" not in rerun.stdout
    assert not (run / "error.json").exists()  # the folder now holds a complete run only

    reference = tmp_path / "uninterrupted"
    pipeline.run(compose_cfg(reference, *RUN), reference)
    for name in ("accuracy.csv", "layers.csv"):
        assert (run / name).read_text() == (reference / name).read_text()
    summary, expected = (json.loads((folder / "summary.json").read_text()) for folder in (run, reference))
    for key in ("ann_accuracy", "snn_accuracy", "sops_per_image", "checkpoint_sha256"):
        assert summary[key] == expected[key]


@pytest.fixture
def logs(caplog):
    caplog.set_level(logging.INFO, logger="snnbench")
    return caplog


def test_corrupted_cached_ann_is_detected_and_rebuilt(tmp_path, logs):
    cfg = compose_cfg(tmp_path, *RUN)
    first = pipeline.run(cfg, tmp_path / "first")
    (entry,) = (tmp_path / "cache" / "ann").glob("*_*.pt")
    assert [p.name for p in entry.parent.glob("*.progress.pt")] == []  # per-epoch progress is gone once cached
    data = bytearray(entry.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: torch might still load it, with a wrong weight
    entry.write_bytes(bytes(data))

    logs.clear()
    second = pipeline.run(cfg, tmp_path / "second")
    assert f"cache entry {entry} does not match its recorded sha256 and config key" in logs.text
    assert "training ANN" in logs.text and "using cached ANN" not in logs.text
    for key in ("ann_accuracy", "snn_accuracy", "events_per_image", "checkpoint_sha256"):
        assert second[key] == first[key]

    logs.clear()
    pipeline.run(cfg, tmp_path / "third")
    assert "using cached ANN" in logs.text and "WARNING" not in logs.text


@pytest.mark.parametrize("damage", ["flipped byte", "truncated", "record missing", "record garbled",
                                    "record of another config", "unloadable"])
def test_damaged_cache_entry_is_rebuilt_never_used(tmp_path, logs, damage):
    path = tmp_path / "entry.bin"
    record = path.with_suffix(".json")

    def load(p):
        if damage == "unloadable":
            raise ValueError("written by an older version")
        return p.read_bytes()

    def build_from(value):
        return lambda: value

    assert cached(path, "key", build_from(b"good value"), bytes, load)[2] is False
    if damage == "flipped byte":
        path.write_bytes(b"good valuf")
    elif damage == "truncated":
        path.write_bytes(b"good")
    elif damage == "record missing":  # interrupted between writing the entry and its record
        record.unlink()
    elif damage == "record garbled":
        record.write_text('{"key": "key", "sha')
    elif damage == "record of another config":
        record.write_text(json.dumps({**json.loads(record.read_text()), "key": "other key"}))

    logs.clear()
    value, digest, was_cached = cached(path, "key", build_from(b"good value"), bytes, load)
    assert (value, was_cached) == (b"good value", False)
    assert f"cache entry {path} does not match its recorded sha256 and config key, or cannot be loaded" in logs.text
    assert json.loads(record.read_text())["sha256"] == digest
    if damage != "unloadable":
        assert cached(path, "key", build_from(b"not used"), bytes, load) == (b"good value", digest, True)


class InterruptedAt:
    """Training batches that raise KeyboardInterrupt (as Ctrl-C would) when the `at`-th batch is due."""

    def __init__(self, batches, at):
        self.batches, self.at, self.generator = batches, at, batches.generator

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        for count, batch in enumerate(self.batches, start=1):
            if count == self.at:
                raise KeyboardInterrupt
            yield batch


def test_interrupted_training_resumes_from_its_last_finished_epoch(cfg, tmp_path, logs):
    cfg.train.epochs = 3
    splits = build_splits(cfg.dataset)
    progress = tmp_path / "ann.progress.pt"

    def start():
        torch.manual_seed(0)
        model = build_model(cfg.model, cfg.dataset)
        return model, loader(splits.train, 128, shuffle=True, seed=0), loader(splits.test, 256)

    model, train_batches, test_batches = start()
    expected = train(model, train_batches, test_batches, cfg.train, "cpu").state_dict()

    model, train_batches, test_batches = start()
    steps_per_epoch = len(train_batches)
    with pytest.raises(KeyboardInterrupt):  # in the middle of epoch 2
        train(model, InterruptedAt(train_batches, steps_per_epoch + 3), test_batches, cfg.train, "cpu", progress)
    assert progress.exists() and leftovers(tmp_path) == []

    logs.clear()
    model, train_batches, test_batches = start()
    resumed = train(model, train_batches, test_batches, cfg.train, "cpu", progress).state_dict()
    assert f"resuming training after epoch 1 (saved in {progress})" in logs.text
    assert "epoch 1/3" not in logs.text and "epoch 2/3" in logs.text
    for key, tensor in expected.items():
        assert torch.equal(resumed[key], tensor), key


def test_interrupt_while_writing_results_leaves_no_csv_without_summary(tmp_path, monkeypatch):
    def interrupted(path, data):
        raise KeyboardInterrupt

    cfg = compose_cfg(tmp_path, *RUN)
    monkeypatch.setattr(pipeline, "write_json", interrupted)  # after both CSVs, before summary.json
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(cfg, tmp_path / "run")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == []


def test_interrupted_atomic_write_leaves_neither_the_file_nor_a_temporary(tmp_path, monkeypatch):
    def interrupted(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_bytes(tmp_path / "summary.json", b"{}")
    assert list(tmp_path.iterdir()) == []


def test_failing_sweep_job_is_recorded_and_the_others_run(tmp_path):
    sweep = tmp_path / "sweep"
    done = snnbench_run(tmp_path, "-m", "sim.T=0,2", f"hydra.sweep.dir={sweep}", *RUN[:1], "sim.num_samples=20")
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert done.stderr.endswith("error: 1 sweep job(s) failed; their error.json says why\n")
    error = json.loads((sweep / "0_baseline" / "error.json").read_text())
    assert error["error"] == "sim.T must be a positive integer, got 0: set e.g. sim.T=32"
    assert "sim.T=0" in error["overrides"]
    assert json.loads((sweep / "1_baseline" / "summary.json").read_text())["T"] == 2
    assert not (sweep / "1_baseline" / "error.json").exists()
