"""The cache others can write: entries are data that rebuild from snnbench's code (a planted pickle runs nothing),
locks and temporary files never follow links, complete entries are read without a lock, and keys hold
everything that determines an entry (the model, its normalisation, the code)."""

import inspect
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import compose_cfg
from networks import canonical_resnet, rgb_images

from snnbench.app import pipeline
from snnbench.app.cli import CONF_DIR
from snnbench.app.models import build_model
from snnbench.app.train import train, with_activation
from snnbench.conversion import saved
from snnbench.conversion.methods import Context
from snnbench.core.calibrate import calibrate
from snnbench.core.graph import canonicalize
from snnbench.core.neurons import IFNeuron
from snnbench.io import cache
from snnbench.io.cache import cached, data_bytes, load_data
from snnbench.io.data import build_splits, loader
from snnbench.simulation.simulate import simulate

FAST = ("sim.T=4", "train.epochs=1", "sim.num_samples=64")
CONVERSIONS = {"baseline": (), "augmapping": (), "ttrbr split": ("method.restructure=split", "method.tune_images=8"),
               "ttrbr merged": ("method.restructure=merged", "method.tune_images=8"), "calibration_advanced": (),
               "snm": (),
               "qcfs": ("train.activation=qcfs", "train.qcfs_levels=4", "train.qcfs_init=1.0")}


def simulated(snn, x):
    labels = torch.arange(len(x)) % 10
    result = simulate(snn, [(x, labels)], 6, chunk=3)
    return result.correct.tolist(), {name: events.tolist() for name, events in result.events.items()}


@pytest.mark.parametrize("name", CONVERSIONS)
def test_a_saved_conversion_rebuilds_a_network_that_simulates_exactly_like_the_fresh_one(tmp_path, name):
    method, *_ = name.split()
    cfg = compose_cfg(tmp_path, f"method={method}", "sim.T=6", *CONVERSIONS[name])
    ann = canonical_resnet()
    if method == "qcfs":
        ann = with_activation(ann, cfg.train)
    batches = [rgb_images(8, seed) for seed in (1, 2)]
    calibration = calibrate(ann, batches, 99.9, False, "cpu")
    fresh = pipeline.method_of(cfg).convert(ann, calibration, batches, Context(cfg.sim.T, 99.9, cfg.seed))
    rebuilt = saved.rebuilt(torch.load(_written(tmp_path, saved.as_data(fresh)), weights_only=True), ann)

    x = rgb_images(12, seed=3)
    assert simulated(rebuilt.snn, x) == simulated(fresh.snn, x)
    assert rebuilt.snn.state_dict().keys() == fresh.snn.state_dict().keys()
    assert (rebuilt.fan_out, rebuilt.diagnostics, rebuilt.restructuring) == (
        fresh.fan_out, fresh.diagnostics, fresh.restructuring)
    assert rebuilt.calibration.neurons == fresh.calibration.neurons
    assert list(rebuilt.calibration.thresholds) == list(fresh.calibration.thresholds)
    if method == "calibration_advanced":  # the correction gave every neuron an initial potential of its own
        assert any(module.v0.dim() > 0 for module in rebuilt.snn.modules() if isinstance(module, IFNeuron))


def _written(tmp_path, data) -> Path:
    path = tmp_path / "entry.pt"
    path.write_bytes(data_bytes(data))
    return path


def test_a_saved_conversion_that_does_not_fit_is_refused_not_used():
    ann = canonical_resnet()
    batches = [rgb_images(8)]
    calibration = calibrate(ann, batches, 99.9, False, "cpu")
    cfg = compose_cfg(Path("/nonexistent"), "method=baseline")
    data = saved.as_data(pipeline.method_of(cfg).convert(ann, calibration, batches, Context(6, 99.9, 0)))
    name = next(iter(data["neurons"]))
    unknown = {**data, "neurons": {**data["neurons"], name: {**data["neurons"][name], "class": "Evil"}}}
    with pytest.raises(ValueError, match="names class 'Evil', which is not one of snnbench's"):
        saved.rebuilt(unknown, ann)
    missing = {**data, "state": {k: v for k, v in data["state"].items() if not k.endswith("conv1.weight")}}
    with pytest.raises(RuntimeError, match="Missing key"):
        saved.rebuilt(missing, ann)
    reshaped = {**data, "state": {k: v[:1] if k.endswith("conv1.weight") else v for k, v in data["state"].items()}}
    with pytest.raises(RuntimeError, match="size mismatch"):
        saved.rebuilt(reshaped, ann)
    other = {**data, "modules": {**data["modules"], name: "Conv2d"}}
    with pytest.raises(ValueError, match=f"module '{name}' is a IFNeuron rebuilt, a Conv2d saved"):
        saved.rebuilt(other, ann)
    # every setting a neuron is made with is saved: its buffers in the state, its knobs beside its class (a knob
    # added to IFNeuron must be added to the saved form)
    settings = set(inspect.signature(IFNeuron).parameters)
    assert settings == {"threshold", "v0", "bias", *data["neurons"][name]} - {"class"}


# ---- the cache as others can write it ----

def run_cli(folder, cache_dir, *overrides, code=None, env=None):
    """`snnbench run FAST OVERRIDES` with its run folder `folder`/run and the cache `cache_dir`."""
    start = ["-c", code] if code else ["-m", "snnbench"]
    return subprocess.run([sys.executable, *start, "run", *FAST, *overrides, f"hydra.run.dir={folder / 'run'}",
                           f"cache_dir={cache_dir}"], cwd=CONF_DIR.parent, capture_output=True, text=True,
                          env=env, timeout=600)


def results(folder) -> dict:
    return {name: (folder / "run" / name).read_text() for name in ("accuracy.csv", "layers.csv", "counts.json")}


class Planted:
    """A pickle whose unpickling creates `marker`: what an attacker puts in a cache entry."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_an_attacker_who_can_write_the_cache_runs_no_code_and_touches_no_file_outside_it(tmp_path):
    cache_dir, marker, victim = tmp_path / "cache", tmp_path / "planted-code-ran", tmp_path / "victim.txt"
    first = run_cli(tmp_path / "first", cache_dir)
    assert first.returncode == 0, first.stderr

    entries = sorted(p for p in cache_dir.rglob("*.pt"))
    assert [p.parent.name for p in entries] == ["ann", "calibration", "conversion"]
    for entry in entries:  # every entry a pickle that runs code, its sha256 record fixed to match
        torch.save({"weights": Planted(marker)}, entry)
        record = entry.with_suffix(".json")
        record.write_text(json.dumps({**json.loads(record.read_text()), "sha256": cache.sha256_of(entry)}))
    torch.load(entries[0], weights_only=False)  # the plant is live: an unsafe load runs it
    assert marker.exists()
    marker.unlink()
    victim.write_text("outside the cache\n")
    os.utime(victim, ns=(1, 1))
    planted = [entry.with_suffix(".lock") for entry in entries] + [
        entries[0].with_suffix(".progress.pt"),  # the ANN's training progress
        *(entry.parent / f".{entry.name}.{suffix}.tmp" for entry in entries for suffix in ("tmp", "aaaaaaaa")),
        *(entry.parent / f".{entry.with_suffix('.json').name}.aaaaaaaa.tmp" for entry in entries)]
    for link in planted:
        link.unlink(missing_ok=True)
        link.symlink_to(victim)
    entries[2].with_suffix(".lock").unlink()
    os.link(victim, entries[2].with_suffix(".lock"))  # a hard link: opened to lock, it must not be truncated

    rerun = run_cli(tmp_path / "rerun", cache_dir)
    assert rerun.returncode == 0, rerun.stderr
    assert not marker.exists()
    assert victim.read_text() == "outside the cache\n" and victim.stat().st_mtime_ns == 1
    assert results(tmp_path / "rerun") == results(tmp_path / "first")
    for entry in entries:
        assert f"cache entry {entry} does not match its recorded sha256 and config key, or cannot be loaded" in (
            rerun.stderr.replace("\n", " "))
        assert not entry.with_suffix(".lock").is_symlink()
    assert "is a symbolic link" in rerun.stderr and "Traceback" not in rerun.stderr
    summary = json.loads((tmp_path / "rerun" / "run" / "summary.json").read_text())
    assert summary["cache_entries"] == {entry.parent.name: cache.sha256_of(entry) for entry in entries}


READ_ONLY = """
import errno, os
from snnbench.app.cli import main

real_open, cache = os.open, os.environ["READ_ONLY_CACHE"]

def read_only(path, flags, *args, **kwargs):  # what a read-only mount or another user's cache says, even to root
    if os.path.abspath(path).startswith(cache) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
        raise PermissionError(errno.EACCES, "Permission denied", path)
    return real_open(path, flags, *args, **kwargs)

os.open = read_only
main()
"""


def snapshot(folder) -> dict:
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_a_read_only_cache_serves_its_complete_entries_and_names_a_missing_one(tmp_path):
    cache_dir = tmp_path / "cache"
    first = run_cli(tmp_path / "first", cache_dir)
    assert first.returncode == 0, first.stderr
    for entry in cache_dir.rglob("*.lock"):  # as a cache another user populated and we cannot write holds them
        entry.unlink()
    before = snapshot(cache_dir)
    env = {**os.environ, "READ_ONLY_CACHE": str(cache_dir)}
    subprocess.run(["chmod", "-R", "a-w", str(cache_dir)], check=True)  # stops writes unless we are root
    try:
        rerun = run_cli(tmp_path / "rerun", cache_dir, code=READ_ONLY, env=env)
        assert rerun.returncode == 0, rerun.stderr
        assert "using cached conversion" in rerun.stderr
        assert results(tmp_path / "rerun") == results(tmp_path / "first")

        missing = run_cli(tmp_path / "missing", cache_dir, "method=augmapping", code=READ_ONLY, env=env)
        assert missing.returncode == 2, missing.stderr
        last = missing.stderr.splitlines()[-1]
        assert last.startswith(f"error: cannot write the cache entry {cache_dir}/conversion/augmapping_")
        assert last.endswith(".pt (Permission denied): set cache_dir=<a folder that can be written> (or env "
                             "SNNBENCH_CACHE)")
        assert snapshot(cache_dir) == before
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(cache_dir)], check=True)


def test_a_link_planted_at_a_lock_is_removed_never_followed(tmp_path, caplog):
    victim, path = tmp_path / "victim.txt", tmp_path / "cache" / "entry.pt"
    victim.write_text("keep me")
    path.parent.mkdir()
    path.with_suffix(".lock").symlink_to(victim)
    value, _, was_cached = cached(path, "key", lambda: {"x": torch.ones(2)}, data_bytes, load_data)
    assert not was_cached and torch.equal(value["x"], torch.ones(2))
    assert victim.read_text() == "keep me"
    assert not path.with_suffix(".lock").is_symlink()
    assert f"cache lock {path.with_suffix('.lock')} is a symbolic link (to {victim}), which snnbench never " \
           "follows: removed it" in caplog.text
    assert cached(path, "key", lambda: {"x": torch.zeros(2)}, data_bytes, load_data)[2] is True


# ---- keys: everything that determines an entry ----

TRANSPOSED = """
from snnbench.models.convnet import ConvNet


class Transposed(ConvNet):
    \"\"\"The MLP's modules and state_dict, fed the image transposed: another function of the same weights.\"\"\"

    def forward(self, x):
        return self.classifier(self.features(self.normalize(x.transpose(2, 3))))
"""
TRANSPOSED_MODEL = ("model=custom", "model.name=transposed", "+model._target_=transposed.Transposed",
                    "model.normalizes_input=true", "+model.layers=[]", "+model.hidden=[128,64]",
                    "+model.in_channels=1", "+model.image_size=8", "+model.num_classes=10", "+model.mean=[0.305]",
                    "+model.std=[0.376]")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A trained MLP's weights (a cached ANN entry is a state_dict)."""
    folder = tmp_path_factory.mktemp("trained")
    run = pipeline.run(compose_cfg(folder, *FAST), folder / "run")
    assert run["cache_entries"]["ann"]
    (entry,) = (folder / "cache" / "ann").glob("*.pt")
    return entry


def scored(folder, *overrides) -> dict:
    summary = pipeline.run(compose_cfg(folder, *FAST, *overrides), folder / "run")
    return {**{key: summary[key] for key in ("ann_accuracy", "snn_accuracy", "events_per_image")},
            **{name: (folder / "run" / name).read_text() for name in ("accuracy.csv", "layers.csv")}}


@pytest.mark.parametrize("other", ["model class", "normalisation"])
def test_the_same_checkpoint_in_another_model_gives_what_a_fresh_cache_gives(tmp_path, monkeypatch, checkpoint,
                                                                            other):
    (tmp_path / "transposed.py").write_text(TRANSPOSED)
    monkeypatch.syspath_prepend(str(tmp_path))
    weights = f"train.checkpoint={checkpoint}"
    model = TRANSPOSED_MODEL if other == "model class" else ("+model.normalize={mean:[0.5],std:[0.2]}",)
    shared = tmp_path / "shared"
    first = scored(shared, weights)
    again = scored(shared, weights, *model)
    fresh = scored(tmp_path / "fresh", weights, *model)
    assert again == fresh
    assert again["ann_accuracy"] != first["ann_accuracy"]  # another function of the same weights indeed


def test_a_change_to_a_methods_code_changes_the_conversion_key_and_a_comment_does_not(tmp_path, monkeypatch, cfg):
    ann = canonicalize(pipeline.build_ann(cfg)).module

    def keys(edit=None):
        """The conversion key, and the training's and calibration's code versions, of a copy of the package with
        `edit` applied to its baseline method."""
        copy = tmp_path / f"copy{len(list(tmp_path.iterdir()))}"
        shutil.copytree(cache.PACKAGE_ROOT, copy, ignore=shutil.ignore_patterns("__pycache__"))
        baseline = copy / "conversion" / "methods" / "baseline.py"
        if edit:
            edited = edit(baseline.read_text())
            assert edited != baseline.read_text()
            baseline.write_text(edited)
        with monkeypatch.context() as patch:
            patch.setattr(cache, "PACKAGE_ROOT", copy)
            return (pipeline.conversion_key(cfg, ann, "sha"), cache.code_version(*pipeline.ANN_CODE),
                    cache.code_version(*pipeline.CALIBRATION_CODE))

    original = keys()
    assert original == (pipeline.conversion_key(cfg, ann, "sha"), *original[1:])  # the copy is the package
    assert keys(lambda text: text.replace('"""Threshold balancing', '# a comment\n"""Threshold')) == original
    assert keys(lambda text: text.replace("Threshold balancing", "Balanced thresholds")) == original  # a docstring
    conversion, ann_code, calibration_code = keys(lambda text: text.replace("v0=self.v0)", "v0=0.5)"))
    assert conversion != original[0]
    assert (ann_code, calibration_code) == original[1:]  # training and calibration do not run that code


def test_a_conversion_entry_written_by_other_code_is_rebuilt_with_a_warning(tmp_path, caplog):
    cfg = compose_cfg(tmp_path, *FAST)
    expected = pipeline.run(cfg, tmp_path / "first")
    (entry,) = (tmp_path / "cache" / "conversion").glob("*.pt")
    data = load_data(entry)
    del data["restructuring"]  # the layout of another version
    entry.write_bytes(data_bytes(data))
    record = entry.with_suffix(".json")
    record.write_text(json.dumps({**json.loads(record.read_text()), "sha256": cache.sha256_of(entry)}))
    rerun = pipeline.run(cfg, tmp_path / "rerun")
    assert "cannot be loaded (KeyError: 'restructuring';" in caplog.text
    assert (rerun["snn_accuracy"], rerun["events_per_image"]) == (expected["snn_accuracy"],
                                                                  expected["events_per_image"])
    assert rerun["cache_entries"]["conversion"] == cache.sha256_of(entry)  # the entry rebuilt


@pytest.mark.parametrize("layout", ["no optimizer", "another model", "epoch missing"])
def test_a_progress_file_of_another_layout_restarts_training_with_a_warning(cfg, tmp_path, caplog, layout):
    cfg.train.epochs = 1
    splits = build_splits(cfg.dataset)

    def trained(progress):
        torch.manual_seed(0)
        batches = loader(splits.train, 128, shuffle=True, seed=0)
        return train(build_model(cfg.model, cfg.dataset), batches, loader(splits.test, 256), cfg.train, "cpu",
                     progress).state_dict()

    expected = trained(None)
    progress = tmp_path / "ann.progress.pt"
    model = build_model(cfg.model, cfg.dataset).state_dict()
    saved_state = {"no optimizer": {"epoch": 1, "model": model, "random": {"cpu": torch.get_rng_state()}},
                   "another model": {"epoch": 1, "model": {"weight": torch.ones(3)}, "optimizer": {}, "schedule": {},
                                     "random": {"cpu": torch.get_rng_state()}},
                   "epoch missing": {"model": {k: v + 1 for k, v in model.items()}, "random": {}}}[layout]
    progress.write_bytes(data_bytes(saved_state))
    result = trained(progress)
    assert re.search(rf"cannot resume training from {re.escape(str(progress))} \(\w+Error\): starting from epoch 1",
                     caplog.text)
    assert all(torch.equal(result[k], expected[k]) for k in expected)  # as if there had been no progress file


HOLD_THE_LOCK = """
import sys, time
from pathlib import Path
from snnbench.io.cache import claimed
with claimed(Path(sys.argv[1])):
    print("holding", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def test_a_run_waiting_on_another_runs_lock_says_which_run_once_and_keeps_waiting(tmp_path, caplog):
    entry = tmp_path / "ann" / "entry.pt"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_THE_LOCK, str(entry), "3"], stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout.readline() == "holding\n"
    with caplog.at_level("INFO", logger="snnbench"):
        value, _, was_cached = cached(entry, "key", lambda: {"x": 1}, data_bytes, load_data)
    holder.wait()
    assert value == {"x": 1} and not was_cached
    waits = [r.getMessage() for r in caplog.records if r.getMessage().startswith("waiting for cache entry")]
    assert len(waits) == 1
    assert f"run {holder.pid} on {os.uname().nodename}" in waits[0]
    assert not entry.with_suffix(".holder.json").exists()


def test_temporary_files_a_killed_run_left_are_removed_when_the_entry_is_built(tmp_path):
    entry = tmp_path / "conversion" / "entry.pt"
    entry.parent.mkdir()
    leftovers = [entry.parent / ".entry.pt.abc123.tmp", entry.parent / ".entry.json.def456.tmp"]
    other = entry.parent / ".other.pt.xyz.tmp"  # another entry's: not this build's to remove
    for path in (*leftovers, other):
        path.write_bytes(b"half")
    cached(entry, "key", lambda: {"x": 1}, data_bytes, load_data)
    assert not any(path.exists() for path in leftovers) and other.exists()
