import json
import subprocess
import sys

import pandas as pd
import pytest

from snnbench.cli import CONF_DIR
from snnbench.integer_conv import int8_conv_available

ROOT = CONF_DIR.parent


def snnbench(*args, cwd=ROOT, env=None):
    return subprocess.run([sys.executable, "-m", "snnbench", *args], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=600)


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


def test_cfg_job_prints_the_composed_config():
    done = snnbench("run", "method=augmapping", "sim.T=7", "--cfg", "job")
    assert done.returncode == 0
    assert "T: 7" in done.stdout and "name: augmapping" in done.stdout


def test_list_shows_groups():
    done = snnbench("list")
    assert done.returncode == 0
    for word in ("digits", "cifar10", "resnet20", "baseline", "augmapping"):
        assert word in done.stdout


def test_help_on_every_command():
    for command in ([], ["run"], ["list"]):
        assert snnbench(*command, "--help").returncode == 0


@pytest.mark.skipif(not int8_conv_available(), reason="this PyTorch has no oneDNN int8 convolution")
def test_integer_convolutions_end_to_end_agree_with_float(tmp_path):
    """cnn_small on digits: its second conv is fed by pooled spikes, its first by the image."""
    accuracy = {}
    for setting in ("true", "false"):
        out = tmp_path / setting
        done = snnbench("run", "model=cnn_small", "sim.T=8", "train.epochs=1", "sim.num_samples=64",
                        f"sim.integer_conv={setting}", f"hydra.run.dir={out}", f"cache_dir={tmp_path / 'cache'}")
        assert done.returncode == 0, done.stderr
        summary = json.loads((out / "summary.json").read_text())
        assert summary["integer_conv_min_depth"] == (0 if setting == "true" else None)
        accuracy[setting] = pd.read_csv(out / "accuracy.csv").accuracy
    # the same network: the two arithmetics may flip a spike at a threshold, not the picture
    assert (accuracy["true"] - accuracy["false"]).abs().max() <= 2 / 64
