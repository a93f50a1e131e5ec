"""Interrupted runs, damaged caches and failing sweep jobs: nothing partial looks complete, nothing damaged is
trusted, and a rerun gives the results an uninterrupted run gives."""

import json
import logging
import os
import re
import shutil

import pytest
from helpers import compose_cfg, snnbench_run

from snnbench.app import pipeline
from snnbench.app.models import build_model
from snnbench.app.train import train
from snnbench.io.cache import cached
from snnbench.io.data import build_splits, loader
from snnbench.io.files import atomic_write_bytes

RUN = ("train.epochs=2", "sim.T=8", "sim.num_samples=40", "sim.batch_size=8")
RESULTS = ("accuracy.csv", "layers.csv", "summary.json")

# The real CLI, with one function wrapped so that the process sends itself SIGTERM at the same point every time:
# after the first simulated batch, or after training epoch 1 (of 2) was saved.
SIGTERM_DURING = {
    "simulation": """
import os, signal
from snnbench import api
from snnbench.app.cli import main

simulate = api.simulate

def simulate_until_sigterm(*args, progress, **kwargs):
    def progress_then_sigterm(images):
        progress(images)
        os.kill(os.getpid(), signal.SIGTERM)
    return simulate(*args, progress=progress_then_sigterm, **kwargs)

api.simulate = simulate_until_sigterm
main()
""",
    "training": """
import os, signal
from snnbench.app import train
from snnbench.app.cli import main

save_progress = train._save_progress

def save_progress_then_sigterm(*args):
    save_progress(*args)
    os.kill(os.getpid(), signal.SIGTERM)

train._save_progress = save_progress_then_sigterm
main()
""",
}
RESUMED_FROM = {"simulation": ("using cached ANN", "using cached calibration"),
                "training": ("resuming training after epoch 1", "epoch 2/2")}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The results of RUN from start to end, without interruption."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    pipeline.run(compose_cfg(folder, *RUN), folder)
    return folder


def leftovers(folder):
    return sorted(p.name for p in folder.rglob("*") if p.name.endswith((".tmp", ".partial")))


@pytest.mark.parametrize("stage", SIGTERM_DURING)
def test_sigterm_then_rerun_resumes_and_matches_an_uninterrupted_run(tmp_path, stage, uninterrupted):
    run = tmp_path / "run"
    killed = snnbench_run(tmp_path, *RUN, code=SIGTERM_DURING[stage])
    assert killed.returncode == 130, killed.stderr
    assert "Traceback" not in killed.stderr
    assert killed.stderr.endswith("\nerror: interrupted: finished stages and training epochs are saved; "
                                  "rerun the same command to resume\n")  # after the log lines
    assert not [name for name in RESULTS if (run / name).exists()]
    assert leftovers(tmp_path) == []
    assert json.loads((run / "error.json").read_text())["type"] == "KeyboardInterrupt"
    progress = list((tmp_path / "cache" / "ann").glob("*.progress.pt"))
    assert len(progress) == (stage == "training")  # epoch 1 saved; once the ANN is cached, no progress is kept

    rerun = snnbench_run(tmp_path, *RUN)
    assert rerun.returncode == 0, rerun.stderr
    for line in RESUMED_FROM[stage]:
        assert line in rerun.stderr
    assert "epoch 1/2" not in rerun.stderr  # no finished epoch is trained twice
    assert not (run / "error.json").exists()  # the folder now holds a complete run only
    assert not list((tmp_path / "cache" / "ann").glob("*.progress.pt"))

    for name in ("accuracy.csv", "layers.csv"):
        assert (run / name).read_text() == (uninterrupted / name).read_text()
    summary, expected = (json.loads((folder / "summary.json").read_text()) for folder in (run, uninterrupted))
    for key in ("ann_accuracy", "snn_accuracy", "sops_per_image", "checkpoint_sha256"):
        assert summary[key] == expected[key]


@pytest.fixture
def logs(caplog):
    caplog.set_level(logging.INFO, logger="snnbench")
    return caplog


def test_corrupted_cached_ann_is_detected_and_rebuilt(tmp_path, logs, uninterrupted):
    shutil.copytree(uninterrupted / "cache", tmp_path / "cache")  # the cache an earlier run left
    (entry,) = (tmp_path / "cache" / "ann").glob("*_*.pt")
    assert [p.name for p in entry.parent.glob("*.progress.pt")] == []  # per-epoch progress is gone once cached
    data = bytearray(entry.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: torch might still load it, with a wrong weight
    entry.write_bytes(bytes(data))

    cfg = compose_cfg(tmp_path, *RUN)
    rebuilt = pipeline.run(cfg, tmp_path / "rebuilt")
    assert f"cache entry {entry} does not match its recorded sha256 and config key" in logs.text
    assert "training ANN" in logs.text and "using cached ANN" not in logs.text
    expected = json.loads((uninterrupted / "summary.json").read_text())
    for key in ("ann_accuracy", "snn_accuracy", "events_per_image", "checkpoint_sha256"):
        assert rebuilt[key] == expected[key]

    logs.clear()
    pipeline.run(cfg, tmp_path / "again")
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


def test_damaged_training_progress_restarts_training_with_a_warning(cfg, tmp_path, logs):
    cfg.train.epochs = 1
    progress = tmp_path / "ann.progress.pt"
    progress.write_bytes(b"half a progress fi")
    splits = build_splits(cfg.dataset)
    train(build_model(cfg.model, cfg.dataset), loader(splits.train, 128, shuffle=True), loader(splits.test, 256),
          cfg.train, "cpu", progress)
    assert re.search(rf"cannot resume training from {re.escape(str(progress))} \(\w+Error\): starting from epoch 1",
                     logs.text)
    assert "epoch 1/1" in logs.text
    assert progress.exists()  # replaced by the state after epoch 1


def test_interrupt_while_writing_results_leaves_no_csv_without_summary(tmp_path, monkeypatch, uninterrupted):
    def interrupted(path, data):
        raise KeyboardInterrupt

    shutil.copytree(uninterrupted / "cache", tmp_path / "cache")  # no training: straight to the results
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
