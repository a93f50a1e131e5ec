import json
import os
import re
import subprocess
import sys

import pandas as pd
import pytest
from helpers import ROOT, snnbench

from snnbench.simulation.integer_conv import int8_conv_available


def test_run_end_to_end_on_digits(tmp_path):
    out = tmp_path / "run"
    done = snnbench("run", "sim.T=4", "train.epochs=2", "sim.num_samples=60", f"hydra.run.dir={out}",
                    f"cache_dir={tmp_path / 'cache'}")
    assert done.returncode == 0, done.stderr
    accuracy = pd.read_csv(out / "accuracy.csv")
    assert list(accuracy.columns) == ["method", "dataset", "model", "t", "accuracy", "events_per_image",
                                      "spike_units_per_image", "sops_per_image"]
    assert accuracy.t.tolist() == [1, 2, 3, 4]
    assert accuracy.events_per_image.is_monotonic_increasing
    layers = pd.read_csv(out / "layers.csv")
    assert list(layers.columns)[:7] == ["layer", "neurons", "threshold", "events_per_image",
                                        "spike_units_per_image", "firing_rate", "sops_per_image"]
    summary = json.loads((out / "summary.json").read_text())
    for key in ("ann_accuracy", "snn_accuracy", "T", "method", "dataset", "model", "macs_per_image",
                "energy_ann_uj", "energy_snn_uj", "time_simulate_s", "checkpoint", "checkpoint_sha256"):
        assert key in summary
    assert summary["snn_accuracy"] == accuracy.accuracy.iloc[-1]
    assert (out / ".hydra" / "config.yaml").exists()
    # results on stdout, diagnostics on stderr, ending with where the results went
    assert "SNN accuracy %" in done.stdout and "training ANN" not in done.stdout
    assert "training ANN" in done.stderr and "SNN accuracy %" not in done.stderr
    assert done.stderr.endswith(f"results in {out}\n")


def test_cfg_job_prints_the_composed_config():
    done = snnbench("run", "method=augmapping", "sim.T=7", "--cfg", "job")
    assert done.returncode == 0
    assert "T: 7" in done.stdout and "name: augmapping" in done.stdout


def test_list_shows_groups():
    done = snnbench("list")
    assert done.returncode == 0
    for word in ("digits", "cifar10", "resnet20", "baseline", "augmapping"):
        assert word in done.stdout
    assert re.search(r"export\s+│ snn\b", done.stdout)  # the exporters' row


def test_help_on_every_command():
    for command in ([], ["run"], ["list"], ["report"], ["bench"]):
        assert snnbench(*command, "--help").returncode == 0


def test_run_help_lists_hydra_flags_and_config_groups_with_their_options():
    done = snnbench("run", "--help", env={**os.environ, "COLUMNS": "200"})
    assert done.returncode == 0
    for text in ("-m ", "--cfg job", "--hydra-help", "KEY=VALUE", "GROUP=OPTION", "dataset=", "fashion_mnist",
                 "model=", "resnet20", "method=", "ttrbr", "experiment=", "digits_methods", "hydra/launcher=",
                 "submitit_local", "outputs/runs/<date>/<time>_<dataset>_<method>/"):
        assert text in done.stdout, text


@pytest.mark.skipif(not int8_conv_available(), reason="this PyTorch has no oneDNN int8 convolution")
def test_integer_convolutions_end_to_end_agree_with_float(tmp_path):
    """cnn_small on digits: its second conv is fed by pooled spikes, its first by the image."""
    accuracy = {}
    for engine in (["engine=int8", "engine.min_depth=0"], ["engine=torch"]):  # every spike-fed layer in integers
        out = tmp_path / engine[0].removeprefix("engine=")
        done = snnbench("run", "model=cnn_small", "sim.T=8", "train.epochs=1", "sim.num_samples=64", *engine,
                        f"hydra.run.dir={out}", f"cache_dir={tmp_path / 'cache'}")
        assert done.returncode == 0, done.stderr
        summary = json.loads((out / "summary.json").read_text())
        assert summary["engine_options"] == ({"_target_": "snnbench.simulation.engines.int8.Int8", "name": "int8",
                                              "min_depth": 0} if engine[0] == "engine=int8" else
                                             {"_target_": "snnbench.simulation.engines.torch.Torch", "name": "torch"})
        accuracy[summary["engine"]] = pd.read_csv(out / "accuracy.csv").accuracy
    # the same network: the two arithmetics may flip a spike at a threshold, not the picture
    assert (accuracy["int8"] - accuracy["torch"]).abs().max() <= 2 / 64


def test_in_a_terminal_log_lines_print_above_the_progress_bar_never_onto_it(tmp_path):
    """The real CLI on a pseudo-terminal: each epoch's log line has a line of its own, with no bar in it."""
    import pty
    import re

    leader, follower = pty.openpty()
    run = subprocess.Popen([sys.executable, "-m", "snnbench", "run", "sim.T=4", "train.epochs=3", "sim.num_samples=60",
                            f"hydra.run.dir={tmp_path / 'run'}", f"cache_dir={tmp_path / 'cache'}"], cwd=ROOT,
                           stdin=follower, stdout=follower, stderr=follower,
                           env={**os.environ, "TERM": "xterm", "COLUMNS": "160"})
    os.close(follower)
    output = b""
    while True:
        try:
            chunk = os.read(leader, 1 << 16)
        except OSError:  # the process closed the terminal
            break
        if not chunk:
            break
        output += chunk
    assert run.wait(timeout=600) == 0
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", output.decode(errors="replace"))
    lines = [line for line in re.split(r"[\r\n]", text) if "epoch" in line and "test accuracy" in line]
    assert len(lines) >= 3 and not [line for line in lines if "━" in line or "training" in line], lines
