"""The conversion core on the traced graph: every ReLU call site becomes its own spiking layer, BatchNorm folds,
Dropout goes, anything that is not a ReLU or a linear map is refused naming the node; on snnbench's networks,
torchvision's and a researcher's own module."""

import pytest
import torch
import torchvision
from omegaconf import OmegaConf
from torch import nn
from user_models import GatedProduct, Mixed, WithGelu

from snnbench.app.models import build_model
from snnbench.conversion.methods import spiking_copy
from snnbench.core.analysis import fan_out
from snnbench.core.calibrate import calibrate, record_activations
from snnbench.core.graph import canonicalize, spiking_layer_names, trace
from snnbench.core.neurons import IFNeuron
from snnbench.errors import UserError
from snnbench.io.checkpoints import load_checkpoint
from snnbench.simulation.simulate import simulate

DATA = OmegaConf.create({"channels": 3, "image_size": 16, "num_classes": 10, "mean": [0.5] * 3, "std": [0.25] * 3})
RELU_CALLS = {"resnet18": 17, "vgg16_bn": 15, "mixed": 10}


def randomised(model):
    """Non-trivial BatchNorm statistics, so folding has something to get wrong."""
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
            module.running_mean.copy_(torch.rand(module.num_features, generator=generator) * 2 - 1)
            module.running_var.copy_(torch.rand(module.num_features, generator=generator) * 1.5 + 0.5)
            module.weight.data.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
            module.bias.data.copy_(torch.rand(module.num_features, generator=generator) - 0.5)
    return model.eval()


def network(name):
    torch.manual_seed(0)
    if name == "mixed":
        return randomised(Mixed(in_channels=3)), torch.rand(4, 3, 16, 16)
    model = getattr(torchvision.models, name)(num_classes=10)
    return randomised(model), torch.rand(2, 3, 32, 32)


def relu_calls(model) -> list:
    """The ReLU call sites left in a traced model, in any form."""
    modules = dict(model.named_modules())
    return [n for n in trace(model).graph.nodes
            if n.op == "call_module" and isinstance(modules[n.target], nn.ReLU)
            or n.op == "call_function" and n.target in (torch.relu, torch.relu_, nn.functional.relu)
            or n.op == "call_method" and n.target in ("relu", "relu_")]


@pytest.mark.parametrize("spec", [
    {"name": "mlp", "arch": "convnet", "layers": [], "hidden": [32, 16]},
    {"name": "cnn", "arch": "convnet", "layers": [8, "P", 16, "P"], "hidden": [32]},
    {"name": "resnet20", "arch": "resnet", "depth": 20},
])
def test_bn_folding_preserves_the_logits_of_snnbench_models(spec):
    model = randomised(build_model(OmegaConf.create(spec), DATA))
    x = torch.rand(4, 3, 16, 16)
    canonical = canonicalize(model).module
    assert not any(isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d) for m in canonical.modules())
    torch.testing.assert_close(canonical(x), model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["resnet18", "vgg16_bn", "mixed"])
def test_every_relu_call_site_becomes_one_spiking_layer(name):
    model, x = network(name)
    result = canonicalize(model, maxpool="avg")
    canonical = result.module
    assert not any(isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d | nn.Dropout | nn.MaxPool2d)
                   for m in canonical.modules())
    layers = spiking_layer_names(canonical)
    assert len(layers) == len(set(layers)) == RELU_CALLS[name] == len(relu_calls(model))
    assert list(result.layers) == layers
    with torch.no_grad():
        if name == "mixed":  # nothing to replace: the logits are the model's, with BatchNorm folded
            torch.testing.assert_close(canonical(x), model(x), rtol=1e-4, atol=1e-4)
        # the spiking network holds no analog ReLU in any form: every call site is a neuron
        thresholds = {layer: torch.tensor(1.0) for layer in layers}
        snn = spiking_copy(canonical, thresholds)
        assert relu_calls(snn) == []
        assert len([m for m in snn.modules() if isinstance(m, IFNeuron)]) == RELU_CALLS[name]


def test_a_reused_relu_module_gives_each_call_its_own_layer_and_name():
    model, _ = network("resnet18")
    layers = canonicalize(model, "avg").layers
    assert layers["layer1.0.relu"] == "nn.ReLU layer1.0.relu"
    assert layers["layer1.0.relu_call2"] == "nn.ReLU layer1.0.relu, call 2"
    mixed = canonicalize(network("mixed")[0]).layers
    assert list(mixed)[:3] == ["relu", "relu_call2", "relu_1"]
    assert mixed["relu_call3"] == "nn.ReLU relu, call 3"
    assert mixed["relu_1"].startswith("F.relu at user_models.py:")
    assert sum(origin.startswith("Tensor.relu_ ") for origin in mixed.values()) == 1


def test_folding_bn_after_a_1x1_downsampling_conv_and_removing_dropout_are_reported():
    result = canonicalize(network("mixed")[0])
    assert "shortcut.1 -> shortcut.0" in result.folded
    assert len(result.folded) == 6
    assert result.removed[0] == "dropout (nn.Dropout)" and "dropout" in result.removed[1]


def test_max_pooling_is_refused_unless_replaced():
    model, x = network("resnet18")
    with pytest.raises(UserError, match=r"max pooling \(maxpool \(nn.MaxPool2d\) at resnet.py:\d+\).*maxpool=avg"):
        canonicalize(model)
    result = canonicalize(model, "avg")
    assert result.replaced == ["maxpool (nn.MaxPool2d) -> average pooling"]
    assert isinstance(result.module.get_submodule("maxpool"), nn.AvgPool2d)


@pytest.mark.parametrize(("model", "node"), [
    (WithGelu(), r"cannot convert act \(nn.GELU\) at user_models.py:\d+"),
    (GatedProduct(), r"cannot convert node mul \(_operator.mul\) at user_models.py:\d+"),
])
def test_a_node_that_is_neither_relu_nor_linear_is_refused_by_name(model, node):
    with pytest.raises(UserError, match=node + ".*ReLUs and linear maps only"):
        canonicalize(model)


def test_an_untraceable_model_is_refused_in_one_line():
    class Branching(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    with pytest.raises(UserError, match="torch.fx cannot trace Branching"):
        canonicalize(Branching())


def layer_rates(snn, names, x, T) -> dict:
    """Each named neuron layer's output summed over T steps of the constant input x, divided by T."""
    sums = dict.fromkeys(names, 0)

    def accumulate(name):
        def hook(module, inputs, out):
            sums[name] = sums[name] + out.view(-1, len(x), *out.shape[1:]).sum(0)
        return hook

    hooks = [snn.get_submodule(name).register_forward_hook(accumulate(name)) for name in names]
    simulate(snn, [(x, torch.zeros(len(x), dtype=torch.long))], T, chunk=16)
    for hook in hooks:
        hook.remove()
    return {name: total / T for name, total in sums.items()}


@torch.inference_mode()
def test_for_a_constant_input_each_layers_rate_converges_to_its_ann_activation():
    model, _ = network("mixed")
    x = torch.rand(2, 3, 16, 16)
    canonical = canonicalize(model).module
    calibration = calibrate(canonical, [x], 100.0, False, "cpu")  # exact maxima: nothing is clipped
    names = list(calibration.thresholds)
    targets = record_activations(canonical, names, x)
    errors = {}
    for T in (16, 512):
        rates = layer_rates(spiking_copy(canonical, calibration.thresholds, v0=0.5), names, x, T)
        errors[T] = {name: ((rates[name] - targets[name]).abs().max() / calibration.thresholds[name]).item()
                     for name in names}
    for name in names:
        assert errors[512][name] < errors[16][name]
        assert errors[512][name] < 0.1, name  # in units of the layer's threshold


def test_fan_out_counts_synapses():
    model = build_model(OmegaConf.create({"name": "c", "arch": "convnet", "layers": [8, "P", 16], "hidden": [32]}),
                        DATA)
    canonical = canonicalize(model).module
    names = spiking_layer_names(canonical)
    fans = fan_out(canonical)
    assert fans[names[0]] == 16 * 9          # through the pooling into a 3x3 conv with 16 outputs
    assert fans[names[1]] == 32              # flattened into a linear layer of 32
    resnet = canonicalize(build_model(OmegaConf.create({"name": "r", "arch": "resnet", "depth": 20}), DATA)).module
    # the stem's neuron feeds block 1's conv (16 x 9) and, through the identity shortcut, one neuron
    assert fan_out(resnet)["relu"] == 16 * 9 + 1


def test_a_user_class_builds_from_its_target_and_its_state_dict_loads(tmp_path):
    spec = OmegaConf.create({"name": "mixed", "_target_": "user_models.mixed_factory", "width": 4,
                             "num_classes": 10, "normalizes_input": False, "normalize": None})
    data = OmegaConf.create({**DATA, "channels": 1, "mean": [0.5], "std": [0.25]})
    model = build_model(spec, data)
    assert [n.target for n in model.graph.nodes if n.op == "call_module"][0] == "normalize"
    own = Mixed(in_channels=1, width=4)
    assert model.state_dict().keys() == own.state_dict().keys()  # the normalisation adds no keys
    path = tmp_path / "mine.pt"
    torch.save({f"module.{k}": v for k, v in own.state_dict().items()}, path)  # as saved from DataParallel
    load_checkpoint(model, path)
    x = torch.rand(2, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), own.eval()((x - 0.5) / 0.25))
    torch.save(Mixed(in_channels=1, width=8).state_dict(), path)
    with pytest.raises(UserError, match=r"shape mismatch \(checkpoint vs model\): stem.weight"):
        load_checkpoint(model, path)
    torch.save({**own.state_dict(), "extra.weight": torch.zeros(1)}, path)
    with pytest.raises(UserError, match="unexpected keys: extra.weight"):
        load_checkpoint(model, path)


def test_a_target_that_cannot_be_built_is_named():
    spec = OmegaConf.create({"name": "x", "_target_": "user_models.NoSuchNet", "normalizes_input": True})
    with pytest.raises(UserError, match=r"cannot build model._target_=user_models.NoSuchNet"):
        build_model(spec, DATA)


def test_average_pooling_replaces_max_pooling_before_training_and_changes_the_cache_key():
    from snnbench.app.pipeline import architecture
    from snnbench.core.graph import with_average_pooling

    model = torchvision.models.resnet18(num_classes=10).eval()
    averaged = with_average_pooling(model)
    assert isinstance(averaged.get_submodule("maxpool"), nn.AvgPool2d)
    assert isinstance(model.get_submodule("maxpool"), nn.MaxPool2d)  # the model itself is left as it was
    assert averaged.state_dict().keys() == model.state_dict().keys()
    assert architecture(averaged) != architecture(model)
    plain = Mixed()
    assert with_average_pooling(plain) is plain  # nothing to replace
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(averaged.eval()(x), canonicalize(model, "avg").module(x), rtol=1e-4, atol=1e-4)
