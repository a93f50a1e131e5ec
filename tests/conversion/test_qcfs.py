"""QCFS (Bu et al. 2022): the quantisation-clip-floor-shift activation, its conversion (the SNN's rate at T = L is
the activation), and the training recipe: the activation and the fine-tune start enter the ANN's cache key."""

import shutil

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn

from snnbench.app import pipeline
from snnbench.app.cli import CONF_DIR
from snnbench.app.models import build_model
from snnbench.app.train import with_activation
from snnbench.conversion.methods import Context
from snnbench.core.calibrate import calibrate
from snnbench.core.graph import canonicalize, spiking_layer_names
from snnbench.errors import UserError
from snnbench.io.data import build_splits
from snnbench.models.qcfs import QCFS
from snnbench.simulation.backend import spiking_layers
from snnbench.simulation.simulate import simulate


def config(*overrides):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@pytest.mark.parametrize("levels", [2, 4, 8])
def test_the_snn_rate_at_T_equal_L_is_the_qcfs_activation_for_a_constant_input(levels):
    torch.manual_seed(0)
    qcfs = QCFS(levels, threshold=0.6)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 40), qcfs, nn.Linear(40, 3))
    ann = canonicalize(model).module
    assert spiking_layer_names(ann) == ["2"] and isinstance(ann.get_submodule("2"), QCFS)
    x = torch.rand(32, 1, 4, 4)
    cfg = config("method=qcfs", "train.activation=qcfs", f"train.qcfs_levels={levels}")
    method = pipeline.method_of(cfg)  # trained_with: ${train.activation}, resolved as a run resolves it
    snn = method.convert(ann, calibrate(ann, [x], 99.9, False, "cpu"), [x], Context(levels, 99.9, 0)).snn
    neuron = spiking_layers(snn)["2"]
    assert neuron.threshold.item() == pytest.approx(0.6) and neuron.v0.item() == 0.5
    emitted = []
    hook = neuron.register_forward_hook(lambda m, args, out: emitted.append(out))
    simulate(snn, [(x, torch.zeros(len(x), dtype=torch.long))], levels, chunk=1)  # direct coding: constant current
    hook.remove()
    with torch.no_grad():
        currents = model[1](model[0](x))
        torch.testing.assert_close(sum(emitted) / levels, qcfs(currents))
        assert len(qcfs(currents).unique()) > 2  # several levels are used, not only 0 and lambda


def test_qcfs_floors_forward_and_passes_gradients_straight_through():
    qcfs = QCFS(4, threshold=2.0)
    x = torch.tensor([-1.0, 0.3, 1.1, 1.4, 3.0], requires_grad=True)  # no level on the clip's edges
    out = qcfs(x)
    torch.testing.assert_close(out.detach(), 2.0 * torch.tensor([0, 1, 2, 3, 4]) / 4)  # floor(x L / lambda + 1/2)
    out.sum().backward()
    # inside the clip the floor's gradient is the identity's; outside the clamp passes none
    torch.testing.assert_close(x.grad, torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0]))
    assert qcfs.threshold.grad is not None and qcfs.threshold.grad.item() != 0


def test_the_qcfs_recipe_gives_each_relu_module_a_qcfs_activation(cfg):
    cfg.train.activation, cfg.train.qcfs_levels = "qcfs", 4
    plain = build_model(cfg.model, cfg.dataset)
    quantized = with_activation(plain, cfg.train, {"net.2": 3.0})
    activations = {name: m for name, m in quantized.named_modules() if isinstance(m, nn.ReLU)}
    assert activations and all(isinstance(m, QCFS) and m.levels == 4 for m in activations.values())
    assert {name: m.threshold.item() for name, m in activations.items()} == {
        name: 3.0 if name == "net.2" else 8.0 for name in activations}
    assert not any(isinstance(m, QCFS) for m in plain.modules())  # a copy: the model given is unchanged
    cfg.train.activation = None
    assert with_activation(plain, cfg.train) is plain


class FunctionalReLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 2)

    def forward(self, x):
        return torch.relu(self.linear(x))


class ReusedReLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.relu = nn.Linear(4, 4), nn.Linear(4, 2), nn.ReLU()

    def forward(self, x):
        return self.relu(self.b(self.relu(self.a(x))))


@pytest.mark.parametrize(("model", "message"), [
    (FunctionalReLU(), "node relu is a functional ReLU: make it an nn.ReLU module"),
    (ReusedReLU(), "relu is called more than once: give each call its own nn.ReLU"),
])
def test_the_qcfs_recipe_refuses_relus_that_are_not_one_module_per_call(cfg, model, message):
    cfg.train.activation, cfg.train.qcfs_levels = "qcfs", 4
    with pytest.raises(UserError, match=message):
        with_activation(model, cfg.train)


@pytest.mark.parametrize(("override", "message"), [
    ("train.qcfs_levels=null", "train.activation=qcfs needs train.qcfs_levels"),
    ("train.qcfs_init=-1", "train.qcfs_init must be null"),
    ("train.activation=clip", "train.activation must be null"),
])
def test_bad_qcfs_recipes_are_refused_in_one_line(cfg, override, message):
    cfg.train.activation, cfg.train.qcfs_levels = "qcfs", 4
    key, value = override.split("=")
    cfg.train[key.removeprefix("train.")] = None if value == "null" else (int(value) if value[-1].isdigit() else value)
    with pytest.raises(UserError, match=message):
        with_activation(build_model(cfg.model, cfg.dataset), cfg.train)


def test_method_qcfs_needs_an_ann_trained_with_qcfs():
    with pytest.raises(UserError, match="method=qcfs converts an ANN trained with QCFS activations"):
        pipeline.validate(config("method=qcfs"))
    pipeline.validate(config("method=qcfs", "train.activation=qcfs", "train.qcfs_levels=4"))


def test_qcfs_training_changes_the_cache_key_and_the_cached_network_loads_quantized(cfg):
    cfg.train.epochs, cfg.train.num_samples = 1, 256
    splits = build_splits(cfg.dataset, cfg.cache_dir)
    _, relu_path, _ = pipeline.prepare_ann(cfg, build_model(cfg.model, cfg.dataset), splits, "cpu")
    cfg.train.activation, cfg.train.qcfs_levels, cfg.train.qcfs_init = "qcfs", 4, "activations"
    trained, qcfs_path, digest = pipeline.prepare_ann(cfg, build_model(cfg.model, cfg.dataset), splits, "cpu")
    cfg.train.qcfs_levels = 8
    _, eight_levels, _ = pipeline.prepare_ann(cfg, build_model(cfg.model, cfg.dataset), splits, "cpu")
    assert len({relu_path, qcfs_path, eight_levels}) == 3
    cfg.train.qcfs_levels = 4
    cached, path, cached_digest = pipeline.prepare_ann(cfg, build_model(cfg.model, cfg.dataset), splits, "cpu")
    assert (path, cached_digest) == (qcfs_path, digest)
    assert any(isinstance(m, QCFS) for m in cached.modules())
    x = torch.rand(8, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(cached(x), trained(x))


def test_a_fine_tune_starts_from_its_checkpoint_and_is_keyed_by_its_content(cfg, tmp_path):
    cfg.train.epochs, cfg.train.num_samples = 1, 128
    splits = build_splits(cfg.dataset, cfg.cache_dir)
    trained, trained_path, _ = pipeline.prepare_ann(cfg, build_model(cfg.model, cfg.dataset), splits, "cpu")
    copy = tmp_path / "copy.pt"
    shutil.copy(trained_path, copy)
    cfg.train.epochs, cfg.train.init_checkpoint = 0, str(trained_path)  # no step: the start itself comes back
    start, from_original, _ = pipeline.prepare_ann(cfg, build_model(cfg.model, cfg.dataset), splits, "cpu")
    for name, value in trained.state_dict().items():
        torch.testing.assert_close(start.state_dict()[name], value)
    cfg.train.init_checkpoint = str(copy)
    _, from_copy, _ = pipeline.prepare_ann(cfg, build_model(cfg.model, cfg.dataset), splits, "cpu")
    assert from_copy == from_original  # the same weights under another name: the same entry
    torch.save({k: v + 1 for k, v in trained.state_dict().items()}, copy)
    _, changed, _ = pipeline.prepare_ann(cfg, build_model(cfg.model, cfg.dataset), splits, "cpu")
    assert changed != from_original
    cfg.train.init_checkpoint = str(tmp_path / "missing.pt")
    with pytest.raises(UserError, match="train.init_checkpoint .*missing.pt does not exist"):
        pipeline.prepare_ann(cfg, build_model(cfg.model, cfg.dataset), splits, "cpu")
