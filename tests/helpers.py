"""Helpers the tests of every package share: the CLI as a user runs it, the config it composes, made-up run
folders. The tests folder (TESTS) is on sys.path (pyproject's pytest pythonpath), so these import as `helpers`;
it is also the working directory of runs that name a test model (`model._target_=user_models.<Name>`)."""

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
from hydra import compose, initialize_config_dir

from snnbench.app.cli import CONF_DIR
from snnbench.io.files import write_csv, write_json

ROOT = CONF_DIR.parent
TESTS = Path(__file__).parent


def snnbench(*args, cwd=ROOT, env=None, in_process=False):
    """`python -m snnbench ARGS` in `cwd`; `in_process`: in this process (in_this_process)."""
    if in_process:
        return in_this_process(args, cwd)
    return subprocess.run([sys.executable, "-m", "snnbench", *args], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=600)


def compose_cfg(tmp_path, *overrides):
    """The config `snnbench run OVERRIDES` composes, with its cache under tmp_path."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=[f"cache_dir={tmp_path / 'cache'}", *overrides])


def snnbench_run(tmp_path, *overrides, options=(), code=None, env=None, in_process=False):
    """`python -m snnbench OPTIONS run OVERRIDES` (or `python -c CODE ...`, CODE starting the CLI itself) with
    its run folder and cache under tmp_path; `in_process`: in this process (in_this_process)."""
    args = [*options, "run", *overrides, f"hydra.run.dir={tmp_path / 'run'}", f"cache_dir={tmp_path / 'cache'}"]
    if in_process:
        return in_this_process(args, cwd=ROOT)
    start = ["-c", code] if code else ["-m", "snnbench"]
    return subprocess.run([sys.executable, *start, *args], cwd=ROOT, capture_output=True, text=True, env=env,
                          timeout=600)


def in_this_process(args, cwd) -> subprocess.CompletedProcess:
    """`snnbench ARGS` in `cwd`, run by this process (Typer's test runner): the exit code, stdout and stderr the
    command line gives, without the seconds a new process spends importing torch and torchvision. For runs that
    end in an error before any work; what needs a process of its own (signals, imports, the environment) runs
    with snnbench_run."""
    from typer.testing import CliRunner

    from snnbench.app.cli import app

    previous = os.getcwd()
    os.chdir(cwd)
    try:
        result = CliRunner().invoke(app, [str(arg) for arg in args])
    finally:
        os.chdir(previous)
    return subprocess.CompletedProcess(["snnbench", *args], result.exit_code, result.stdout, result.stderr)


def assert_one_line_error(done, message):
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr == f"error: {message}\n"


def write_overrides(folder, overrides):
    (folder / ".hydra").mkdir(parents=True, exist_ok=True)
    (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))


def fake_run(folder, overrides, accuracy, method=None, ann_accuracy=0.9):
    """A complete run folder as `snnbench run` leaves it, with made-up numbers."""
    method = method or dict(o.split("=") for o in overrides).get("method", "baseline")
    T = len(accuracy)
    write_csv(folder / "accuracy.csv", pd.DataFrame({
        "method": method, "dataset": "digits", "model": "mlp", "t": range(1, T + 1), "accuracy": accuracy,
        "events_per_image": [10.0 * t for t in range(1, T + 1)], "spike_units_per_image": 0.0,
        "sops_per_image": [100.0 * t for t in range(1, T + 1)]}))
    write_csv(folder / "layers.csv", pd.DataFrame({
        "layer": ["classifier.1", "classifier.3"], "neurons": [64, 32], "threshold": 1.0, "events_per_image": 5.0,
        "spike_units_per_image": 5.0, "firing_rate": [0.25, 0.5], "sops_per_image": 50.0}))
    write_overrides(folder, overrides)
    write_json(folder / "summary.json", {"ann_accuracy": ann_accuracy, "snn_accuracy": accuracy[-1], "T": T,
                                         "method": method, "dataset": "digits", "model": "mlp",
                                         "macs_per_image": 1000, "num_test_images": 10})


def sweep(root):
    """Four runs: baseline, termapping and AugMapping at two threshold scales; cache_dir differs between them."""
    runs = [(["method=baseline"], [0.1, 0.5, 0.8]),
            (["method=termapping"], [0.2, 0.6, 0.85]),
            (["method=augmapping", "method.threshold_scale=1.0"], [0.3, 0.7, 0.9]),
            (["method=augmapping", "method.threshold_scale=0.5"], [0.4, 0.75, 0.9])]
    for number, (overrides, accuracy) in enumerate(runs):
        fake_run(root / f"{number}_{number}", ["sim.T=3", f"cache_dir=c{number}", *overrides], accuracy)
    return root
