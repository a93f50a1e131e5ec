"""Bring your own model, end to end through the CLI: `model=custom model._target_=...` from the working directory,
`snnbench inspect`, and refusals that come before any data is read or weights trained."""

import json

import pandas as pd
import pytest
from helpers import TESTS, snnbench


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
                    f"cache_dir={tmp_path / 'cache'}", cwd=TESTS, in_process=True)
    assert done.returncode == 2
    lines = [line for line in (done.stdout + done.stderr).splitlines() if "error" in line]
    assert len(lines) == 1 and "cannot convert act (nn.GELU) at user_models.py:" in lines[0]
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run" / "summary.json").exists()
    inspected = snnbench("inspect", "model=custom", "model._target_=user_models.GatedProduct", cwd=TESTS,
                         in_process=True)
    assert inspected.returncode == 2
    assert "cannot convert node mul (_operator.mul)" in inspected.stdout + inspected.stderr


def test_custom_without_a_target_or_with_a_missing_one_says_what_to_set(tmp_path):
    done = snnbench("run", "model=custom", f"hydra.run.dir={tmp_path / 'run'}", f"cache_dir={tmp_path / 'c'}",
                    in_process=True)
    assert done.returncode == 2
    assert "model=custom needs the class or factory to build: add model._target_=" in done.stdout + done.stderr
    done = snnbench("inspect", "model=custom", "model._target_=user_models.NoSuchNet", cwd=TESTS, in_process=True)
    assert done.returncode == 2
    assert "cannot build model._target_=user_models.NoSuchNet" in done.stdout + done.stderr


def test_torchvision_configs_need_the_max_pool_policy_and_name_it():
    done = snnbench("inspect", "model=torchvision/resnet18", "dataset=cifar10", in_process=True)
    assert done.returncode == 2
    assert "max pooling (maxpool (nn.MaxPool2d) at resnet.py:" in done.stdout + done.stderr
    assert "convert.maxpool=avg" in done.stdout + done.stderr
    done = snnbench("inspect", "model=torchvision/vgg11_bn", "dataset=cifar10", "convert.maxpool=avg", in_process=True)
    assert done.returncode == 0, done.stderr
    assert "10 spiking layers" in done.stdout  # 8 convs and 2 hidden linear layers


def test_snnbench_architectures_normalise_with_the_dataset_or_the_model_config():
    """ConvNet and ResNet take the normalisation as arguments, which their YAML interpolates: the dataset's mean and
    std, or the model config's `normalize` where it sets one."""
    from hydra import compose, initialize_config_dir

    from snnbench.app.models import build_model
    from snnbench.io.configs import CONF_DIR
    from snnbench.models import ConvNet, ResNet

    cases = [("resnet20", "cifar10", [], ResNet, [0.485, 0.456, 0.406]),
             ("resnet20", "cifar10", ["model.normalize={mean:[0.5,0.5,0.5],std:[0.25,0.25,0.25]}"], ResNet,
              [0.5, 0.5, 0.5]),
             ("mlp", "digits", [], ConvNet, [0.305]),
             ("mlp", "digits", ["model.normalize={mean:[0.5],std:[0.25]}"], ConvNet, [0.5])]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for model_name, dataset, overrides, cls, mean in cases:
            cfg = compose(config_name="config", overrides=[f"model={model_name}", f"dataset={dataset}", *overrides])
            model = build_model(cfg.model, cfg.dataset)
            assert type(model) is cls  # nothing put in front: the model normalises its own input
            assert model.normalize.mean.flatten().tolist() == pytest.approx(mean)


def test_a_key_snnbench_architectures_do_not_take_is_one_line():
    done = snnbench("inspect", "model=resnet20", "dataset=cifar10", "+model.widht=3", in_process=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr == ("error: cannot build model._target_=snnbench.models.ResNet (TypeError: ResNet.__init__() "
                           "got an unexpected keyword argument 'widht'): the target must be importable (from the "
                           "working directory or PYTHONPATH) and accept the keys given (add new ones with "
                           "+model.<key>=...)\n")
