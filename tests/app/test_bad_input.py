"""Issue 25's bad input and faults, through the CLI: non-finite and out-of-range values refused before torch is
imported, choices checked at the start, models that cannot be converted refused by `run` (before training) and
`inspect`, `report` surviving damaged run folders, full disks, leftovers of killed runs, the working directory
on sys.path, and the Triton interpreter one block at a time. Each case: the exit status, the one-line message
and the files left behind."""

import errno
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from helpers import TESTS, assert_one_line_error, compose_cfg, fake_run, in_this_process, snnbench_run, sweep
from typer.testing import CliRunner

from snnbench.app import report
from snnbench.app.cli import CONF_DIR, app
from snnbench.app.models import build_model
from snnbench.errors import UserError
from snnbench.io.files import atomic_write_bytes, write_json

SNNBENCH = Path(sys.executable).parent / "snnbench"  # the installed command: python -m would put the cwd first
QUICK = ("train.epochs=1", "sim.T=4", "sim.num_samples=20")
# the CLI, reporting at exit whether torch was imported
WATCHING_TORCH = ("import atexit, sys\n"
                  "atexit.register(lambda: print('torch imported' if 'torch' in sys.modules else 'torch not imported',"
                  " file=sys.stderr))\n"
                  "from snnbench.app.cli import main\n"
                  "main()\n")

REFUSED_BEFORE_TORCH = {
    "NaN membrane start": (["method.v0=nan"], "method.v0 must be a finite number, got nan"),
    "infinite threshold scale": (["method=augmapping", "method.threshold_scale=inf"],
                                 "method.threshold_scale must be a finite number, got inf"),
    "negative energy": (["energy.mac_pj=-1"], "energy.mac_pj must be a non-negative number (picojoules per "
                                              "operation), got -1: e.g. energy.mac_pj=4.6"),
    "infinite energy": (["energy.ac_pj=inf"], "energy.ac_pj must be a non-negative number (picojoules per "
                                              "operation), got inf: e.g. energy.ac_pj=0.9"),
    "negative memory cap": (["sim.max_memory_mb=-5"],
                            "sim.max_memory_mb must be a positive number or null (megabytes the activations of a "
                            "chunk may take; null: half the free memory), got -5: e.g. sim.max_memory_mb=4096"),
    "NaN learning rate": (["train.lr=nan"], "train.lr must be a positive number, got nan: e.g. train.lr=0.05"),
    "momentum of 1": (["train.momentum=1"], "train.momentum must be a number in [0, 1), got 1: e.g. "
                                            "train.momentum=0.9"),
    "NaN in the normalisation": (["dataset.std=[nan]"], "dataset.std[0] must be a finite number, got nan"),
    "seed not a number": (["seed=abc"], "seed must be a non-negative integer, got 'abc': e.g. seed=0"),
    "negative seed": (["seed=-1"], "seed must be a non-negative integer, got -1: e.g. seed=0"),
    "fractional seed": (["seed=1.5"], "seed must be a non-negative integer, got 1.5: e.g. seed=0"),
    "unknown calibration rule": (["calibrate.rule=nosuch"],
                                 "calibrate.rule must be one of percentile, local_balancing, got 'nosuch'"),
    "empty cache_dir": (["cache_dir="], "cache_dir must name a folder, got '': e.g. cache_dir=outputs/cache (or "
                                        "unset it)"),
}


@pytest.mark.parametrize("overrides, message", REFUSED_BEFORE_TORCH.values(), ids=REFUSED_BEFORE_TORCH.keys())
def test_bad_values_and_choices_are_refused_before_torch_is_imported(tmp_path, overrides, message):
    done = subprocess.run([sys.executable, "-c", WATCHING_TORCH, "run", f"cache_dir={tmp_path / 'cache'}",
                           *overrides, f"hydra.run.dir={tmp_path / 'run'}"], cwd=CONF_DIR.parent,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 2
    assert done.stderr == f"error: {message}\ntorch not imported\n"
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".hydra", ".lock", "error.json"]
    assert json.loads((tmp_path / "run" / "error.json").read_text())["error"] == message
    assert not (tmp_path / "cache").exists()


METHOD_CASES = {
    "a preset's knob": (["method=burst", "method.c_max=0"],
                        "method.c_max must be a positive integer or null, got 0: set e.g. method.c_max=4"),
    "not a method class": (["method._target_=snnbench.io.files.write_json"],
                           "method._target_=snnbench.io.files.write_json names no subclass of "
                           "snnbench.conversion.methods.Method in snnbench.io.files: name one (e.g. "
                           "snnbench.conversion.methods.augmapping.AugMapping)"),
    "an unimportable class": (["method._target_=nowhere.Method"],
                              "method._target_=nowhere.Method: cannot import nowhere (ModuleNotFoundError: No module "
                              "named 'nowhere'): it must be importable from the working directory or PYTHONPATH"),
    "a name no folder can hold": (["method.name=a/b"], "method.name must be a name of letters, digits, _ . or - (it "
                                                       "names run folders and results), got 'a/b'"),
    "unknown method": (["method=foo"], "unknown method 'foo': choose one of "
                                       + ", ".join(sorted(p.stem for p in (CONF_DIR / "method").glob("*.yaml")))),
}


@pytest.mark.parametrize("overrides, message", METHOD_CASES.values(), ids=METHOD_CASES.keys())
def test_a_bad_method_config_is_refused_in_one_line_before_any_work(tmp_path, overrides, message):
    """The method is built from cfg.method (its `_target_` class with its knobs) before data or training."""
    done = snnbench_run(tmp_path, *overrides, in_process=True)
    assert_one_line_error(done, message)
    assert not (tmp_path / "cache").exists()


def test_empty_cache_variable_means_the_default(tmp_path):
    done = subprocess.run([sys.executable, "-m", "snnbench", "run", "--cfg", "job", "--resolve"], cwd=CONF_DIR.parent,
                          capture_output=True, text=True, env={**os.environ, "SNNBENCH_CACHE": ""}, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "\ncache_dir: outputs/cache\n" in done.stdout


@pytest.mark.parametrize("value, kind", [(float("nan"), "NaN"), (float("inf"), "an infinity")])
def test_a_checkpoint_that_is_not_finite_is_refused_naming_the_tensor(tmp_path, value, kind):
    cfg = compose_cfg(tmp_path)
    state = build_model(cfg.model, cfg.dataset).state_dict()
    state["classifier.4.weight"][3, 5] = value
    torch.save(state, tmp_path / "diverged.pt")
    done = snnbench_run(tmp_path, f"train.checkpoint={tmp_path / 'diverged.pt'}", *QUICK)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    message = (f"checkpoint {tmp_path / 'diverged.pt'} holds {kind} in classifier.4.weight: its weights are unusable "
               "(a training that diverged?); point train.checkpoint at a checkpoint whose weights are finite")
    assert done.stderr.endswith(f"\nerror: {message}\n")
    assert "calibrating" not in done.stderr
    assert not [p.name for p in (tmp_path / "run").iterdir() if p.suffix == ".csv" or p.name == "summary.json"]
    assert json.loads((tmp_path / "run" / "error.json").read_text())["error"] == message


def strict_json(path):
    """The file parsed by a JSON reader that refuses NaN and Infinity tokens, as other languages' readers do."""
    def refuse(token):
        raise ValueError(f"{path.name} holds {token}")
    return json.loads(path.read_text(), parse_constant=refuse)


def test_json_never_holds_a_nan_token(tmp_path):
    with pytest.raises(UserError) as raised:
        write_json(tmp_path / "summary.json", {"T": 4, "energy": {"snn_uj": float("nan")}})
    assert str(raised.value) == (f"cannot write {tmp_path / 'summary.json'}: its energy.snn_uj is nan, which JSON "
                                 "cannot hold (the run's numbers overflowed or became undefined: check its knobs "
                                 "and checkpoint for extreme values)")
    assert list(tmp_path.iterdir()) == []


MODELS = {
    "ReturnsTuple": "the model's forward returns a tuple, not one tensor of logits: return only the logits (batch x "
                    "classes), e.g. `return logits` instead of a tuple or dict",
    "ReturnsDict": "the model's forward returns a dict, not one tensor of logits: return only the logits (batch x "
                   "classes), e.g. `return logits` instead of a tuple or dict",
    "NoReLU": "the model has no ReLU, so nothing becomes a spiking neuron: put a ReLU (nn.ReLU, F.relu) after its "
              "conv or linear layers",
    "NoParameters": "the model has no parameters (no conv or linear layer): there are no weights to train or "
                    "convert; give it at least one nn.Conv2d or nn.Linear",
    "TooDeep": "the model shrinks a 1x8x8 image to nothing at pools.3 (nn.AvgPool2d) at bad_models.py:53 (Given "
               "input size: (4x1x1). Calculated output size: (4x0x0). Output size is too small): it is too deep for "
               "the dataset's image size; use a shallower model or fewer poolings",
    "PooledToNothing": "the model shrinks a 1x8x8 image to nothing at pools (nn.AdaptiveAvgPool2d) at "
                       "bad_models.py:53 (output 4x0x0): it is too deep for the dataset's image size; use a "
                       "shallower model or fewer poolings",
    "FiveClasses": "the model's output has shape 1x5 for one image, not 1x10 (one logit per class of the dataset, "
                   "dataset.num_classes=10): give the model 10 outputs (e.g. +model.num_classes=10)",
}


@pytest.mark.parametrize("name", MODELS)
def test_a_model_that_cannot_be_scored_is_refused_by_run_before_training_and_by_inspect(tmp_path, name):
    done = in_this_process(["run", "model=custom", f"model._target_=bad_models.{name}", *QUICK,
                            f"hydra.run.dir={tmp_path / 'run'}", f"cache_dir={tmp_path / 'cache'}"], cwd=TESTS)
    assert_one_line_error(done, MODELS[name])  # not a log line before it: no data was read, nothing trained
    assert not (tmp_path / "cache").exists()
    assert json.loads((tmp_path / "run" / "error.json").read_text())["error"] == MODELS[name]
    inspected = in_this_process(["inspect", "model=custom", f"model._target_=bad_models.{name}"], cwd=TESTS)
    assert_one_line_error(inspected, MODELS[name])


def damage_runs(root):
    """A sweep of four good runs and five damaged ones, by what is damaged."""
    sweep(root)
    damaged = {}
    for number, what in enumerate(("summary.json", "error.json", "overrides.yaml", "accuracy.csv", "layers.csv"),
                                  start=4):
        run = root / f"{number}_{what}"
        fake_run(run, ["method=baseline", f"seed={number}"], [0.1, 0.5, 0.8])
        damaged[what] = run
    (damaged["summary.json"] / "summary.json").write_text('{"ann_accuracy": 0.9, "T": ')
    (damaged["error.json"] / "summary.json").unlink()
    (damaged["error.json"] / "error.json").write_text("{not json")
    (damaged["overrides.yaml"] / ".hydra" / "overrides.yaml").write_text("- [unclosed\n")
    accuracy = damaged["accuracy.csv"] / "accuracy.csv"
    accuracy.write_bytes(accuracy.read_bytes()[:-40])  # cut inside its last row
    (damaged["layers.csv"] / "layers.csv").unlink()
    return damaged


def test_report_lists_each_unreadable_run_and_reports_the_rest(tmp_path):
    damaged = damage_runs(tmp_path / "sweep")
    done = CliRunner().invoke(app, ["report", str(tmp_path / "sweep")])
    assert done.exit_code == 0, done.output
    assert "Traceback" not in done.output
    failed = pd.read_csv(tmp_path / "sweep" / "failed.csv").set_index("run")
    assert sorted(failed.index) == sorted(map(str, damaged.values()))
    assert set(failed.status) == {"unreadable"}
    reasons = {what: failed.error[str(run)] for what, run in damaged.items()}
    assert reasons["summary.json"].startswith("cannot read summary.json (JSONDecodeError: ")
    assert reasons["error.json"].startswith("cannot read error.json (JSONDecodeError: ")
    assert reasons["overrides.yaml"].startswith("cannot read overrides.yaml (")
    assert reasons["accuracy.csv"] == ("cannot read accuracy.csv (ValueError: not one complete row for each t = "
                                       "1..3: truncated?): the run is left out of the report")
    assert reasons["layers.csv"].startswith("cannot read layers.csv (FileNotFoundError: ")
    for run in damaged.values():
        assert f"unreadable: {run}: cannot read " in done.output.replace("\n", "")
    reported = pd.read_csv(tmp_path / "sweep" / "report.csv")
    assert set(reported.run) == {str(tmp_path / "sweep" / f"{number}_{number}") for number in range(4)}


def disk_full(fd):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_report_that_cannot_be_finished_leaves_none_of_its_files(tmp_path, monkeypatch):
    sweep(tmp_path / "sweep")
    write, written = report.atomic_write_bytes, []

    def disk_full_at_the_third_file(path, data):
        written.append(path)
        if len(written) == 3:
            monkeypatch.setattr(os, "fsync", disk_full)
        write(path, data)

    monkeypatch.setattr(report, "atomic_write_bytes", disk_full_at_the_third_file)
    done = CliRunner().invoke(app, ["report", str(tmp_path / "sweep")])
    assert done.exit_code == 2
    assert done.output == (f"error: cannot write {written[2]} (No space left on device): the disk holding "
                           f"{tmp_path / 'sweep'} is full: free space on it, or choose another folder (hydra.run.dir, "
                           "cache_dir, report --out)\n")
    # failed.csv is written first, alone; the tables and plots are all or none
    assert [p.name for p in (tmp_path / "sweep").iterdir() if not p.is_dir()] == ["failed.csv"]


def test_a_full_disk_is_named_with_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(UserError) as raised:
        atomic_write_bytes(tmp_path / "summary.json", b"{}")
    assert str(raised.value) == (f"cannot write {tmp_path / 'summary.json'} (No space left on device): the disk "
                                 f"holding {tmp_path} is full: free space on it, or choose another folder "
                                 "(hydra.run.dir, cache_dir, report --out)")
    assert list(tmp_path.iterdir()) == []


def test_a_run_whose_log_file_is_on_a_full_disk_says_so_once_and_finishes(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "snnbench.log").symlink_to("/dev/full")  # every write to it fails with ENOSPC
    done = snnbench_run(tmp_path, *QUICK)
    assert done.returncode == 0, done.stderr
    assert "Logging error" not in done.stderr and "Traceback" not in done.stderr
    warnings = [line for line in done.stderr.splitlines() if "warning:" in line]
    assert len(warnings) == 1 and warnings[0].endswith(
        f"warning: cannot write the log file {run / 'snnbench.log'} (No space left on device): log lines go to "
        "stderr only")
    summary = strict_json(run / "summary.json")
    assert all(math.isfinite(value) for value in summary.values() if isinstance(value, float))
    strict_json(run / "counts.json")


def test_a_run_folder_on_a_full_disk_is_one_line(tmp_path):
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").symlink_to("/dev/full")  # where Hydra writes the run's config
    done = snnbench_run(tmp_path, *QUICK)
    assert_one_line_error(done, f"cannot write {run} (No space left on device): the disk is full: free space on it, "
                                "or choose a folder on another disk (hydra.run.dir, hydra.sweep.dir, or run from "
                                "another folder)")


KILLED_AFTER_THE_CSVS = """
import os, signal
from snnbench.app import pipeline
from snnbench.app.cli import main

def killed(path, data):
    os.kill(os.getpid(), signal.SIGKILL)

pipeline.write_json = killed  # the CSVs are written, counts.json and summary.json not
main()
"""


def test_what_a_killed_run_left_is_removed_by_the_next_run_in_its_folder(tmp_path):
    run = tmp_path / "run"
    killed = snnbench_run(tmp_path, *QUICK, code=KILLED_AFTER_THE_CSVS)
    assert killed.returncode == -9
    (run / ".layers.csv.x1y2z3.tmp").write_text("half a file")  # as a kill inside a write leaves it
    assert {"accuracy.csv", "layers.csv"} <= {p.name for p in run.iterdir()}
    listed = CliRunner().invoke(app, ["report", str(run)])  # the CSVs alone do not make a complete run
    assert listed.exit_code == 2 and "no complete runs in" in listed.output
    assert pd.read_csv(run / "failed.csv").status.tolist() == ["incomplete"]
    (run / "failed.csv").unlink()
    refused = snnbench_run(tmp_path, "sim.T=0")  # even a refused run claims the folder and clears it first
    assert refused.returncode == 2
    assert sorted(p.name for p in run.iterdir()) == [".hydra", ".lock", "error.json", "snnbench.log"]


def test_a_planted_module_in_the_working_directory_does_not_shadow_torch(tmp_path):
    (tmp_path / "torch.py").write_text(f"open({str(tmp_path / 'planted ran')!r}, 'w').close()\n"
                                       "raise SystemExit('the planted torch.py ran')\n")
    done = subprocess.run([str(SNNBENCH), "run", "model=custom", f"hydra.run.dir={tmp_path / 'run'}",
                           f"cache_dir={tmp_path / 'cache'}"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 2
    assert done.stderr.startswith("error: model=custom needs the class or factory to build")  # checked with torch
    assert not (tmp_path / "planted ran").exists()


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_triton_under_the_interpreter_simulates_one_block_at_a_time_and_matches_torch(tmp_path):
    interpreted = {**os.environ, "TRITON_INTERPRET": "1"}
    runs = {}
    for engine in ("torch", "triton", "triton"):
        folder = tmp_path / f"{engine}{len(runs)}"
        done = subprocess.run([sys.executable, "-m", "snnbench", "run", *QUICK, "sim.batch_size=8", "device=cpu",
                               f"engine={engine}", f"hydra.run.dir={folder}", f"cache_dir={tmp_path / 'cache'}"],
                              cwd=CONF_DIR.parent, capture_output=True, text=True, env=interpreted, timeout=600)
        assert done.returncode == 0, done.stderr
        runs[folder] = json.loads((folder / "summary.json").read_text())
    torch_run, *triton_runs = runs.values()
    for summary in triton_runs:
        assert summary["engine"] == "triton" and summary["blocks_at_once"] == 1
        assert summary["snn_accuracy"] == torch_run["snn_accuracy"]
        assert summary["sops_per_image"] == pytest.approx(torch_run["sops_per_image"])
