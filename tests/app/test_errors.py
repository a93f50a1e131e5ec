"""Bad input ends in one line naming the problem and the fix, a non-zero exit code and no traceback.
Config-level mistakes go through the real CLI; deeper ones call the loaders in-process (a UserError from deep
in the pipeline reaches the same one-line `_fail`, as the missing-dataset case shows through the CLI)."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from helpers import assert_one_line_error, compose_cfg, snnbench_run
from torch import nn

from snnbench.app import pipeline
from snnbench.app.cli import CONF_DIR
from snnbench.app.models import build_model
from snnbench.app.train import train
from snnbench.errors import UserError
from snnbench.io.checkpoints import load_checkpoint
from snnbench.io.data import build_splits, loader

# Hydra lists the model files at the top of conf/model/ (not the nested torchvision/ ones)
MODELS = ", ".join(sorted(path.stem for path in (CONF_DIR / "model").glob("*.yaml")))
ENGINES = "auto, int8, reference, torch, triton"
CLI_CASES = {
    "unknown group option": (["model=mpl"], f"unknown model 'mpl': choose one of {MODELS}"),
    "unknown engine": (["engine=nosuch"], f"unknown engine 'nosuch': choose one of {ENGINES}"),
    "engine option out of range": (["engine=int8", "engine.min_depth=-1"],
                                   "engine.min_depth must be auto or a non-negative integer (0: every spike-fed "
                                   "layer in integers), got -1"),
    "engine that cannot run here": (["engine=triton", "device=cpu"],
                                    "engine=triton runs on CUDA devices (device here: cpu): set device=cuda, or "
                                    "TRITON_INTERPRET=1 to run its kernel on the CPU (slowly, for testing)"),
    "unknown key": (["sim.steps=8"], "unknown config key 'sim.steps': `snnbench run --cfg job` prints the valid keys"),
    "added key": (["+foo=bar"], "unknown config key 'foo' (+foo=bar): no stage reads a key added with + or ++; "
                                "`snnbench run --cfg job` prints the valid keys (change one with foo=...)"),
    "force-added key": (["++sim.steps=8"], "unknown config key 'sim.steps' (++sim.steps=8): no stage reads a key added "
                                           "with + or ++; `snnbench run --cfg job` prints the valid keys (change one "
                                           "with sim.steps=...)"),
    "removed key": (["~sim.T"], "~sim.T removes the config key 'sim.T', which the stages read: set it instead "
                                "(sim.T=...)"),
    "added key that exists": (["+sim.T=8"], "config key 'sim.T' exists already: set it without the + (sim.T=...)"),
    "unknown device": (["device=gpu"], "device must be auto, cpu, cuda or cuda:N (N: a GPU's index), got 'gpu'"),
    "no threshold candidates": (["method=ttrbr", "method.scales=[]"],
                                "method.scales must be a non-empty list of positive numbers (candidate thresholds, "
                                "x the percentile threshold), got []: e.g. method.scales=[0.5,0.75,1.0]"),
    "T fractional": (["sim.T=2.5"], "sim.T must be a positive integer, got 2.5: set e.g. sim.T=32"),
    "T not a number": (["sim.T=abc"], "sim.T must be a positive integer, got 'abc': set e.g. sim.T=32"),
    "percentile above 100": (["calibrate.percentile=101"],
                             "calibrate.percentile must be in (0, 100], got 101: e.g. 99.9, or 100 for max"),
    "negative batch size": (["sim.batch_size=-1"],
                            "sim.batch_size must be a positive integer, got -1: set e.g. sim.batch_size=32"),
    "negative warm-up": (["train.warmup_epochs=-1"], "train.warmup_epochs must be a non-negative integer, got -1"),
    "zero split copies": (["method=ttrbr", "method.copies=0"],
                          "method.copies must be a positive integer, got 0: set e.g. method.copies=2"),
    "unknown restructuring": (["method=ttrbr", "method.restructure=merge"],
                              "method.restructure must be one of none, shortcut_neuron, merged, split, got 'merge'"),
}


@pytest.mark.parametrize("overrides, message", CLI_CASES.values(), ids=CLI_CASES.keys())
def test_cli_rejects_bad_config_in_one_line(tmp_path, overrides, message):
    done = snnbench_run(tmp_path, *overrides, in_process=True)
    assert_one_line_error(done, message)


@pytest.mark.parametrize("flags", [["-m", "--cfg", "job"], ["--cfg", "hydra", "--multirun"]])
def test_hydras_flags_combined_are_refused_in_one_line(tmp_path, flags):
    done = snnbench_run(tmp_path, *flags, "method=baseline,ecmt")
    assert_one_line_error(done, "-m (a sweep), --cfg (print the config) and --info are used one at a time: drop all "
                                "but one (--cfg job prints one run's config: give one option per group)")


def load_error(cfg, path) -> str:
    """The one-line message of loading `path` into the configured model."""
    with pytest.raises(UserError) as raised:
        load_checkpoint(build_model(cfg.model, cfg.dataset), path)
    return str(raised.value)


def test_cli_names_where_missing_dataset_files_were_looked_for(tmp_path):
    done = snnbench_run(tmp_path, "dataset=mnist", f"dataset.root={tmp_path / 'nowhere'}")
    assert_one_line_error(done, f"mnist files not found under {tmp_path}/nowhere/MNIST/raw/ (Dataset not found. "
                                "You can use download=True to download it): set dataset.root=<folder holding "
                                "MNIST/raw/> (or env SNNBENCH_DATA) or dataset.download=true")
    # the run folder records why the run failed, for `snnbench report`
    error = json.loads((tmp_path / "run" / "error.json").read_text())
    assert error["error"] == done.stderr.removeprefix("error: ").strip()
    assert error["type"] == "UserError"


def test_debug_flag_shows_the_traceback(tmp_path):
    done = snnbench_run(tmp_path, "sim.T=0", options=["--debug"])
    assert done.returncode == 2
    assert "Traceback" in done.stderr and "raise UserError" in done.stderr
    assert done.stderr.endswith("\nerror: sim.T must be a positive integer, got 0: set e.g. sim.T=32\n")


def test_debug_variable_shows_the_traceback(tmp_path):
    done = snnbench_run(tmp_path, "model=mpl", env={**os.environ, "SNNBENCH_DEBUG": "1"})
    assert done.returncode == 2
    assert "Traceback" in done.stderr and "MissingConfigException" in done.stderr
    assert done.stderr.endswith(f"\nerror: unknown model 'mpl': choose one of {MODELS}\n")


def test_max_pooling_is_refused_before_training(tmp_path):
    cfg = compose_cfg(tmp_path, "model=cnn_small", "model.pool=max", "train.epochs=1")
    with pytest.raises(UserError) as raised:
        pipeline.run(cfg, tmp_path / "run")
    assert str(raised.value) == ("the model uses max pooling (features.3 (nn.MaxPool2d) at convnet.py:33), which "
                                 "has no exact spiking form: "
                                 "add convert.maxpool=avg to replace it by average pooling")
    assert not (tmp_path / "cache" / "ann").exists()  # refused before an epoch was spent


def test_missing_checkpoint_is_named(cfg, tmp_path):
    with pytest.raises(UserError) as raised:
        load_checkpoint(build_model(cfg.model, cfg.dataset), tmp_path / "best.pt")
    assert str(raised.value) == (f"checkpoint {tmp_path / 'best.pt'} does not exist: fix train.checkpoint "
                                 "(or set it to null to train)")


@pytest.mark.parametrize("key, value, message", [
    ("sim.T", 0, "sim.T must be a positive integer, got 0: set e.g. sim.T=32"),
    ("sim.T", -4, "sim.T must be a positive integer, got -4: set e.g. sim.T=32"),
    ("sim.T", True, "sim.T must be a positive integer, got True: set e.g. sim.T=32"),
    ("calibrate.percentile", 0, "calibrate.percentile must be in (0, 100], got 0: e.g. 99.9, or 100 for max"),
    ("calibrate.percentile", -5.0, "calibrate.percentile must be in (0, 100], got -5.0: e.g. 99.9, or 100 for max"),
    ("calibrate.percentile", float("nan"),
     "calibrate.percentile must be in (0, 100], got nan: e.g. 99.9, or 100 for max"),
    ("sim.batch_size", 0, "sim.batch_size must be a positive integer, got 0: set e.g. sim.batch_size=32"),
    ("train.batch_size", 0, "train.batch_size must be a positive integer, got 0: set e.g. train.batch_size=32"),
    ("calibrate.batch_size", -2,
     "calibrate.batch_size must be a positive integer, got -2: set e.g. calibrate.batch_size=32"),
    ("model.pool", "min", "model.pool must be one of avg, max, got 'min'"),
    ("sim.split", "val", "sim.split must be one of test, train, got 'val'"),
    ("sim.channels_last", "yes", "sim.channels_last must be auto, true or false, got 'yes'"),
    ("sim.sub_batch", 0, "sim.sub_batch must be a positive integer, got 0: set e.g. sim.sub_batch=16"),
    ("sim.chunk", "all", "sim.chunk must be a positive integer, got 'all': set e.g. sim.chunk=16"),
    ("train.num_samples", 0,
     "train.num_samples must be a positive integer, got 0: set e.g. train.num_samples=32"),
])
def test_validate_rejects_bad_values(cfg, key, value, message):
    section, name = key.split(".")
    cfg[section][name] = value
    with pytest.raises(UserError) as raised:
        pipeline.validate(cfg)
    assert str(raised.value) == message


def test_validate_accepts_the_edges(cfg):
    cfg.calibrate.percentile, cfg.sim.T, cfg.sim.batch_size = 100, 1, 1
    pipeline.validate(cfg)


def test_missing_imagefolder_does_not_suggest_a_download(tmp_path):
    cfg = compose_cfg(tmp_path, "dataset=imagefolder", f"dataset.root={tmp_path}")
    with pytest.raises(UserError) as raised:
        build_splits(cfg.dataset)
    assert str(raised.value) == (f"imagefolder files not found under {tmp_path}/train/ and val/: "
                                 "set dataset.root=<folder holding train/ and val/> (or env SNNBENCH_DATA)")


@pytest.fixture
def saved_mlp(cfg, tmp_path):
    """A real checkpoint of the default model (the MLP for digits)."""
    path = tmp_path / "mlp.pt"
    torch.save(build_model(cfg.model, cfg.dataset).state_dict(), path)
    return path


def damage(path, how):
    data = path.read_bytes()
    if how == "random bytes":
        path.write_bytes(bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).tolist()))
    elif how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "text":
        path.write_text("hello, I am not a checkpoint\n")


@pytest.mark.parametrize("how, reason", [
    ("random bytes", r"UnpicklingError: Unsupported operand \d+"),
    ("truncated", r"\w+Error: [^\n]+"),  # where the cut falls decides which part of torch.load notices
    ("empty", "EOFError"),
    ("text", "KeyError: 101"),
])
def test_unreadable_checkpoint_is_named(cfg, saved_mlp, how, reason):
    torch.manual_seed(1)  # the same random bytes every time
    damage(saved_mlp, how)
    message = load_error(cfg, saved_mlp)
    assert re.fullmatch(rf"{re.escape(str(saved_mlp))} is not a PyTorch checkpoint, or it is truncated or "
                        rf"corrupted \({reason}\): point train\.checkpoint at a complete file saved with torch\.save",
                        message)
    assert "weights_only` set to `False" not in message  # torch's advice to load unsafely is dropped


def test_pickled_model_is_refused_by_the_safe_load(cfg, tmp_path):
    path = tmp_path / "whole.pt"
    torch.save(nn.Linear(2, 2), path)
    message = load_error(cfg, path)
    assert message == (
        f"{path} holds Python objects besides tensors (UnpicklingError: Unsupported global: GLOBAL "
        "torch.nn.modules.linear.Linear), which a safe load (weights_only) refuses: re-save it as "
        "torch.save(model.state_dict(), path)")


def test_checkpoint_of_another_model_names_the_first_mismatching_keys(cfg, saved_mlp):
    cfg.model.hidden = [32, 64]  # same layers, other widths
    message = load_error(cfg, saved_mlp)
    assert message == (
        f"checkpoint {saved_mlp} does not match the model (shape mismatch (checkpoint vs model): "
        "classifier.1.weight (128, 64) vs (32, 64), classifier.2.weight (128,) vs (32,), "
        "classifier.2.bias (128,) vs (32,) ...); choose the model= it was trained with")
    cfg.model.hidden = [128]  # a layer fewer
    message = load_error(cfg, saved_mlp)
    assert message == (
        f"checkpoint {saved_mlp} does not match the model (missing keys: classifier.4.bias; unexpected keys: "
        "classifier.5.weight, classifier.5.bias, classifier.5.running_mean ...; shape mismatch (checkpoint vs "
        "model): classifier.4.weight (64, 128) vs (10, 128)); choose the model= it was trained with")


def test_diverging_training_stops_at_the_step_it_diverged(cfg):
    cfg.train.lr, cfg.train.epochs = 1e30, 1
    splits = build_splits(cfg.dataset)
    model = build_model(cfg.model, cfg.dataset)
    with pytest.raises(UserError, match=r"^training loss became (nan|inf) at epoch 1, step \d+: "
                                        r"lower train\.lr \(now 1e\+30\)$"):
        train(model, loader(splits.train, 128, shuffle=True), loader(splits.test, 256), cfg.train, "cpu")


def test_bad_values_are_refused_before_torch_is_imported(tmp_path):
    """The check runs before the pipeline (and torch) is imported: a typo is refused in about a second."""
    code = ("import atexit, sys\n"
            "atexit.register(lambda: print('torch imported' if 'torch' in sys.modules else 'torch not imported', "
            "file=sys.stderr))\n"
            "from snnbench.app.cli import main\n"
            "main()\n")
    for overrides, message in (["sim.T=0"], "sim.T must be a positive integer, got 0: set e.g. sim.T=32"), \
            (["+foo=bar"], CLI_CASES["added key"][1]):
        done = snnbench_run(tmp_path, *overrides, code=code)
        assert done.returncode == 2
        assert done.stderr == f"error: {message}\ntorch not imported\n"


def test_checkpoint_that_is_a_directory_is_named_as_one(cfg, tmp_path):
    assert load_error(cfg, tmp_path) == (f"checkpoint {tmp_path} is a directory: point train.checkpoint at the "
                                         "weights file in it")


def test_checkpoint_holding_code_is_refused_as_code_not_as_corrupted(cfg, tmp_path):
    class RunsACommand:
        def __reduce__(self):
            return os.system, ("echo this must never run",)

    path = tmp_path / "evil.pt"
    torch.save({"weight": RunsACommand()}, path)
    assert load_error(cfg, path) == (
        f"{path} holds Python objects besides tensors (UnpicklingError: Trying to load unsupported GLOBAL posix.system "
        "whose module posix is blocked), which a safe load (weights_only) refuses: re-save it as "
        "torch.save(model.state_dict(), path)")


def test_run_folder_that_cannot_be_written_is_named(tmp_path):
    blocker = tmp_path / "a file"
    blocker.write_text("not a folder\n")
    done = subprocess.run([sys.executable, "-m", "snnbench", "run", "sim.T=2", f"hydra.run.dir={blocker / 'run'}",
                           f"cache_dir={tmp_path / 'cache'}"], cwd=CONF_DIR.parent, capture_output=True, text=True,
                          timeout=600)
    assert_one_line_error(done, f"cannot write {blocker / 'run'} (Not a directory): choose a folder that can be "
                                "written (hydra.run.dir, hydra.sweep.dir, or run from another folder)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a file"]
    # the default folder, outputs/runs/..., under a working directory where `outputs` is a file
    (tmp_path / "outputs").write_text("not a folder\n")
    done = subprocess.run([sys.executable, "-m", "snnbench", "run", "sim.T=2", f"cache_dir={tmp_path / 'cache'}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 2
    assert re.fullmatch(r"error: cannot write outputs/runs/\d{4}-\d\d-\d\d \(Not a directory\): choose a folder "
                        r"that can be written \(hydra\.run\.dir, hydra\.sweep\.dir, or run from another folder\)\n",
                        done.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a file", "outputs"]


def test_cache_folder_that_cannot_be_written_is_named(tmp_path):
    blocker = tmp_path / "a file"
    blocker.write_text("not a folder\n")
    done = subprocess.run([sys.executable, "-m", "snnbench", "run", "sim.T=2", "train.epochs=1",
                           f"hydra.run.dir={tmp_path / 'run'}", f"cache_dir={blocker / 'cache'}"], cwd=CONF_DIR.parent,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    entry = next(iter(done.stderr.splitlines()[-1].split("cannot write the cache entry ", 1)[1:]), "")
    assert entry.startswith(f"{blocker}/cache/ann/digits_mlp_") and entry.endswith(
        ".pt (Not a directory): set cache_dir=<a folder that can be written> (or env SNNBENCH_CACHE)")
    assert json.loads((tmp_path / "run" / "error.json").read_text())["error"] == f"cannot write the cache entry {entry}"


def test_simulation_that_cannot_fit_in_memory_is_refused_before_it_starts(tmp_path):
    done = snnbench_run(tmp_path, "sim.T=10000000000", "train.epochs=1", "sim.num_samples=20")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert re.search(r"\nerror: simulating sim\.T=10000000000 needs about [\d.]+ GB of host memory \([\d.]+ GB of "
                     r"per-step counters for 2 spiking layers, [\d.]+ GB for accuracy\.csv, [\d.]+ GB of "
                     r"activations\), but [\d.]+ GB are free: lower sim\.T\n$", done.stderr)
    assert not [name for name in ("accuracy.csv", "layers.csv", "summary.json") if (tmp_path / "run" / name).exists()]
    assert json.loads((tmp_path / "run" / "error.json").read_text())["type"] == "UserError"


def test_memory_estimate_counts_every_step_of_every_spiking_layer(tmp_path, monkeypatch, caplog):
    """sim.T=100000000 on digits: 2 spiking layers x 4 float64 counters, the correct counts and accuracy.csv's row,
    per step, against a machine with 4 GiB free."""
    from snnbench.simulation import memory

    caplog.set_level("INFO", logger="snnbench")
    monkeypatch.setattr(memory.psutil, "virtual_memory", lambda: type("Memory", (), {"available": 4 * 2**30}))
    cfg = compose_cfg(tmp_path, "sim.T=100000000", "train.epochs=1", "sim.num_samples=20")
    with pytest.raises(UserError) as raised:
        pipeline.run(cfg, tmp_path / "run")
    counters, table = 10**8 * (4 * 8 * 2 + 8) / 2**30, 10**8 * memory.TABLE_BYTES_PER_STEP / 2**30
    assert re.fullmatch(rf"simulating sim\.T=100000000 needs about [\d.]+ GB of host memory \({counters:.1f} GB of "
                        rf"per-step counters for 2 spiking layers, {table:.1f} GB for accuracy\.csv, 0\.0 GB of "
                        r"activations\), but 4\.0 GB are free: lower sim\.T", str(raised.value))
    assert "simulating baseline" not in caplog.text  # refused before the simulation began
    caplog.clear()
    pipeline.run(compose_cfg(tmp_path, "sim.T=4", "train.epochs=1", "sim.num_samples=20"), tmp_path / "small")
    assert re.search(r"simulation memory: about 0\.0 GB host \(.*\); 4\.0 GB host free", caplog.text)
