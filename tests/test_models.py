"""Bring your own model, end to end through the CLI: `model=custom model._target_=...` from the working directory,
`snnbench inspect`, and refusals that come before any data is read or weights trained."""

import json
from pathlib import Path

import pandas as pd
from test_cli import snnbench  # tests/ is on sys.path (pytest rootdir-relative imports)

TESTS = Path(__file__).parent  # the working directory of these runs: user_models.py is importable from it


def test_a_custom_model_trains_converts_and_reports_its_canonical_layers(tmp_path):
    out = tmp_path / "run"
    done = snnbench("run", "model=custom", "model._target_=user_models.mixed_factory", "+model.width=4",
                    "model.name=mixed", "method=ttrbr", "sim.T=4", "train.epochs=1", "sim.num_samples=30",
                    f"hydra.run.dir={out}", f"cache_dir={tmp_path / 'cache'}", cwd=TESTS)
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == "mixed"
    layers = pd.read_csv(out / "layers.csv")
    # ten ReLU call sites; TTRBR splits the two fed by residual additions into two copies (layer.relu)
    assert len(layers) == 10
    assert {"relu", "relu_call2", "relu_1.relu", "relu_4.relu", "relu_call3"} <= set(layers.layer)
    inspected = snnbench("inspect", "model=custom", "model._target_=user_models.mixed_factory", "+model.width=4",
                         cwd=TESTS)
    assert inspected.returncode == 0, inspected.stderr
    assert "10 spiking layers" in inspected.stdout
    for text in ("nn.ReLU relu, call 2", "Tensor.relu_", "folded (6)", "removed (2)"):
        assert text in inspected.stdout


def test_a_model_that_cannot_convert_is_refused_before_the_data_is_read(tmp_path):
    # the data folder does not exist: the GELU is named first, as nothing was loaded or trained
    done = snnbench("run", "model=custom", "model._target_=user_models.WithGelu", "dataset=mnist",
                    f"dataset.root={tmp_path / 'nowhere'}", f"hydra.run.dir={tmp_path / 'run'}",
                    f"cache_dir={tmp_path / 'cache'}", cwd=TESTS)
    assert done.returncode == 2
    lines = [line for line in (done.stdout + done.stderr).splitlines() if "error" in line]
    assert len(lines) == 1 and "cannot convert act (nn.GELU) at user_models.py:" in lines[0]
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run" / "summary.json").exists()
    inspected = snnbench("inspect", "model=custom", "model._target_=user_models.GatedProduct", cwd=TESTS)
    assert inspected.returncode == 2
    assert "cannot convert node mul (_operator.mul)" in inspected.stdout + inspected.stderr


def test_custom_without_a_target_or_with_a_missing_one_says_what_to_set(tmp_path):
    done = snnbench("run", "model=custom", f"hydra.run.dir={tmp_path / 'run'}", f"cache_dir={tmp_path / 'c'}")
    assert done.returncode == 2
    assert "model=custom needs the class or factory to build: add model._target_=" in done.stdout + done.stderr
    done = snnbench("inspect", "model=custom", "model._target_=user_models.NoSuchNet", cwd=TESTS)
    assert done.returncode == 2
    assert "cannot build model._target_=user_models.NoSuchNet" in done.stdout + done.stderr


def test_torchvision_configs_need_the_max_pool_policy_and_name_it():
    done = snnbench("inspect", "model=torchvision/resnet18", "dataset=cifar10")
    assert done.returncode == 2
    assert "max pooling (maxpool (nn.MaxPool2d) at resnet.py:" in done.stdout + done.stderr
    assert "convert.maxpool=avg" in done.stdout + done.stderr
    done = snnbench("inspect", "model=torchvision/vgg11_bn", "dataset=cifar10", "convert.maxpool=avg")
    assert done.returncode == 0, done.stderr
    assert "10 spiking layers" in done.stdout  # 8 convs and 2 hidden linear layers
