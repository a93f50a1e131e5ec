"""The conversion core on the traced graph: every ReLU call site becomes its own spiking layer, BatchNorm folds,
Dropout goes, anything that is not a ReLU or a linear map is refused naming the node; on snnbench's networks,
torchvision's and a researcher's own module."""

import copy
import json
import re

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import torchvision
from helpers import TESTS
from networks import randomised
from omegaconf import OmegaConf
from torch import nn
from user_models import (
    Clipped,
    Depthwise,
    Functional,
    GatedProduct,
    Leaky,
    Mixed,
    MnistExample,
    PreActivation,
    WithGelu,
)

from snnbench.app.models import build_model
from snnbench.conversion.methods import spiking_copy
from snnbench.core.analysis import fan_out
from snnbench.core.calibrate import calibrate, record_activations
from snnbench.core.graph import ClippedReLU, canonicalize, spiking_layer_names, trace, with_average_pooling
from snnbench.core.neurons import IFNeuron
from snnbench.errors import UserError
from snnbench.io.checkpoints import load_checkpoint
from snnbench.simulation.simulate import simulate

DATA = OmegaConf.create({"channels": 3, "image_size": 16, "num_classes": 10, "mean": [0.5] * 3, "std": [0.25] * 3})


def snnbench_model(spec: dict):
    """The config of one of snnbench's architectures for DATA, with the values its conf/model YAML interpolates."""
    return OmegaConf.create({**spec, "in_channels": DATA.channels, "num_classes": DATA.num_classes,
                             "mean": list(DATA.mean), "std": list(DATA.std), "normalizes_input": True})


RELU_CALLS = {"resnet18": 17, "vgg16_bn": 15, "mixed": 10}


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
    {"name": "mlp", "_target_": "snnbench.models.ConvNet", "image_size": 16, "layers": [], "hidden": [32, 16]},
    {"name": "cnn", "_target_": "snnbench.models.ConvNet", "image_size": 16, "layers": [8, "P", 16, "P"],
     "hidden": [32]},
    {"name": "resnet20", "_target_": "snnbench.models.ResNet", "depth": 20},
])
def test_bn_folding_preserves_the_logits_of_snnbench_models(spec):
    model = randomised(build_model(snnbench_model(spec), DATA))
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
    with pytest.raises(UserError, match=node + ".*no exact spiking form; add convert.nonlinear=compensate"):
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


@pytest.mark.parametrize("name", ["mixed", "clipped", "leaky"])
@torch.inference_mode()
def test_for_a_constant_input_each_layers_rate_converges_to_its_ann_activation(name):
    torch.manual_seed(0)
    model = network("mixed")[0] if name == "mixed" else {"clipped": Clipped, "leaky": Leaky}[name](in_channels=3)
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
    model = build_model(snnbench_model({"name": "c", "_target_": "snnbench.models.ConvNet", "image_size": 16,
                                        "layers": [8, "P", 16], "hidden": [32]}), DATA)
    canonical = canonicalize(model).module
    names = spiking_layer_names(canonical)
    fans = fan_out(canonical)
    assert fans[names[0]] == 16 * 9          # through the pooling into a 3x3 conv with 16 outputs
    assert fans[names[1]] == 32              # flattened into a linear layer of 32
    resnet = canonicalize(build_model(snnbench_model({"name": "r", "_target_": "snnbench.models.ResNet", "depth": 20}),
                                      DATA)).module
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


def exact(model, x, maxpool="error"):
    """The canonical network of `model`, checked to compute the model's logits (eval mode)."""
    result = canonicalize(model, maxpool)
    with torch.no_grad():
        torch.testing.assert_close(result.module(x), model.eval()(x), rtol=1e-5, atol=1e-5)
    assert list(result.layers) == spiking_layer_names(result.module)
    return result


def test_every_clipped_relu_form_is_a_spiking_layer_that_knows_its_clip():
    torch.manual_seed(0)
    result = exact(Clipped(in_channels=3), torch.randn(4, 3, 8, 8))
    layers = [result.module.get_submodule(name) for name in result.layers]
    assert [layer.clip for layer in layers if isinstance(layer, ClippedReLU)] == [6, 6, 3, 2, 4, 5]
    assert [type(layer) for layer in layers[6:]] == [nn.ReLU, nn.ReLU]  # clamp at 0 without an upper end
    assert list(result.layers.values())[:2] == ["nn.ReLU6 relu6", next(
        origin for origin in result.layers.values() if origin.startswith("F.relu6 at user_models.py:"))]
    # the neurons' threshold never exceeds the clip, and c_max x threshold neither
    snn = spiking_copy(result.module, dict.fromkeys(result.layers, torch.tensor(100.0)))
    neurons = [snn.get_submodule(name) for name in result.layers]
    assert [n.threshold.item() for n in neurons] == [6, 6, 3, 2, 4, 5, 100, 100]
    snn = spiking_copy(result.module, dict.fromkeys(result.layers, torch.tensor(1.5)), c_max=None)
    assert [snn.get_submodule(name).c_max for name in result.layers] == [4, 4, 2, 1, 2, 3, None, None]
    # calibration: the maximum of a clipped layer's outputs is at most the clip, and local balancing (which grows
    # the threshold by twice the mean overflow) stops there
    x = torch.randn(8, 3, 8, 8) * 10
    for rule in ("percentile", "local_balancing"):
        thresholds = calibrate(result.module, [x] * 5, 100.0, False, "cpu", rule=rule).thresholds
        assert all(thresholds[name] <= layer.clip for name, layer in zip(result.layers, layers, strict=True)
                   if isinstance(layer, ClippedReLU))
    saturated = canonicalize(nn.Sequential(nn.ReLU6())).module  # every output at the clip: balancing would give 12
    for rule in ("percentile", "local_balancing"):
        assert calibrate(saturated, [torch.full((4, 3), 10.0)], 100.0, False, "cpu", rule=rule).thresholds["0"] == 6


def test_leaky_relus_are_two_spiking_layers_whose_sum_is_the_leaky_activation():
    torch.manual_seed(0)
    result = exact(Leaky(in_channels=3), torch.randn(4, 3, 8, 8))
    assert list(result.layers) == ["leaky_positive", "leaky_negative", "prelu_positive", "prelu_negative",
                                   "leaky_relu_positive", "leaky_relu_negative"]
    assert result.layers["prelu_negative"] == "nn.PReLU prelu, negative part (x slope)"
    assert result.layers["leaky_relu_positive"].startswith("F.leaky_relu at user_models.py:")


@pytest.mark.parametrize("forward", [lambda x: F.hardtanh(x), lambda x: x.clamp(-1, 1),
                                     lambda x: torch.clamp(x, min=0, max=-1)])
def test_a_clip_that_is_not_at_zero_is_refused_naming_compensate(forward):
    class Clip(nn.Module):
        def forward(self, x):
            return forward(x)

    with pytest.raises(UserError, match=r"cannot convert node \w+ .*convert.nonlinear=compensate"):
        canonicalize(Clip())


def test_affine_maps_anywhere_and_operations_on_sizes_are_kept():
    torch.manual_seed(0)
    model = randomised(PreActivation(in_channels=3))
    x = torch.randn(4, 3, 8, 8)
    result = exact(model, x)
    assert len(result.layers) == 2 and result.folded == []
    assert [re.sub(r" at user_models.py:\d+$", "", affine) for affine in result.affine] == [
        "bn_after_add (nn.BatchNorm2d)", "bn_after_cat (nn.BatchNorm2d)", "node batch_norm (F.batch_norm)"]
    # traced in training mode (as snnbench traces a model it trains), F.batch_norm still uses the running statistics
    from snnbench.core.graph import trainable_trace
    canonical = canonicalize(trainable_trace(copy.deepcopy(model).train())).module
    with torch.no_grad():
        torch.testing.assert_close(canonical(x), model.eval()(x))


def test_the_classic_mnist_example_converts_with_average_pooling():
    model, x = MnistExample().eval(), torch.rand(2, 1, 28, 28)
    with pytest.raises(UserError, match=r"max pooling \(node max_pool2d \(F.max_pool2d\) at user_models.py:\d+\)"):
        canonicalize(model)
    result = canonicalize(model, "avg")
    assert result.replaced == ["node max_pool2d (F.max_pool2d) -> average pooling"]
    assert result.removed[:2] == ["dropout1 (nn.Dropout)", "dropout2 (nn.Dropout)"]
    assert re.fullmatch(r"node log_softmax \(F.log_softmax\) at user_models.py:\d+, which ends the classifier "
                        r"\(the argmax is the same without it\)", result.removed[2])
    averaged = with_average_pooling(model).eval()
    with torch.no_grad():
        torch.testing.assert_close(F.log_softmax(result.module(x), 1), averaged(x))
    from test_cli import snnbench

    inspected = snnbench("inspect", "model=custom", "model._target_=user_models.MnistExample", "dataset=mnist",
                         "convert.maxpool=avg", cwd=TESTS)
    assert inspected.returncode == 0, inspected.stderr
    assert "which ends the classifier (the argmax is the same without it)" in inspected.stdout
    assert "replaced (1): node max_pool2d (F.max_pool2d) -> average pooling" in inspected.stdout


def test_max_pooling_keeps_its_windows_or_is_refused():
    class Pooled(nn.Module):
        def __init__(self, dilation):
            super().__init__()
            self.dilation = dilation

        def forward(self, x):
            return F.max_pool2d(x, 3, 2, 1, dilation=self.dilation, ceil_mode=True).flatten(1)

    pool = canonicalize(Pooled(1), "avg").module.get_submodule("avg_pool")
    assert (pool.kernel_size, pool.stride, pool.padding, pool.ceil_mode) == (3, 2, 1, True)
    with pytest.raises(UserError, match=r"cannot replace max pooling node max_pool2d \(F.max_pool2d\) at "
                                        r"test_convert.py:\d+ by average pooling: its dilation 2"):
        canonicalize(Pooled(2), "avg")


def test_an_unexpected_failure_while_rewriting_is_refused_naming_the_node(monkeypatch):
    def broken(conv, bn):
        raise RuntimeError("no fusion today")

    monkeypatch.setattr("snnbench.core.graph.fuse_conv_bn_eval", broken)
    with pytest.raises(UserError, match=r"^cannot convert stem_bn \(nn.BatchNorm2d\) at user_models.py:\d+: "
                                        r"rewriting it failed \(RuntimeError: no fusion today\)"):
        canonicalize(network("mixed")[0])


def test_grouped_and_depthwise_convs_fan_out_to_their_group_only():
    canonical = canonicalize(Depthwise(in_channels=3)).module
    fans = fan_out(canonical)
    assert fans["relu1"] == 9            # one channel's 3 x 3 kernel, not 16 x 9
    assert fans["relu2"] == 16           # the 1 x 1 pointwise conv
    grouped = nn.Sequential(nn.Conv2d(3, 16, 1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, groups=4))
    assert fan_out(canonicalize(grouped).module)["1"] == 32 / 4 * 9 / 4


def test_a_depthwise_layers_sops_are_its_events_times_its_kernel_in_layers_csv(tmp_path):
    from test_cli import snnbench

    out = tmp_path / "run"
    done = snnbench("run", "model=custom", "model._target_=user_models.Depthwise", "model.name=depthwise", "sim.T=4",
                    "train.epochs=1", "sim.num_samples=30", f"hydra.run.dir={out}", f"cache_dir={tmp_path / 'cache'}",
                    cwd=TESTS)
    assert done.returncode == 0, done.stderr
    layers = pd.read_csv(out / "layers.csv").set_index("layer")
    # by hand: a spike of relu1 (16 channels) reaches the 3 x 3 kernel of its own channel in the depthwise conv,
    # 9 synapses, not 16 x 9; relu2's reaches the 16 outputs of the 1 x 1 pointwise conv, relu3's the 10 logits
    synapses = {"relu1": 9, "relu2": 16, "relu3": 10}
    for layer, per_spike in synapses.items():
        assert layers.loc[layer, "events_per_image"] > 0
        assert layers.loc[layer, "sops_per_image"] == pytest.approx(layers.loc[layer, "events_per_image"] * per_spike)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sops_per_image"] == pytest.approx(layers.sops_per_image.sum())


def test_weight_layers_written_as_functions_become_the_layers_that_hold_their_weights():
    torch.manual_seed(0)
    model = Functional(in_channels=3)
    result = exact(model, torch.rand(2, 3, 8, 8))
    layers = [m for m in result.module.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    assert [(type(m), m.groups if isinstance(m, nn.Conv2d) else None) for m in layers] == [
        (nn.Conv2d, 1), (nn.Conv2d, 8), (nn.Linear, None)]
    assert layers[0].weight is result.module.conv_weight  # the same tensors: nothing copied, nothing counted twice
    assert sum(p.numel() for p in result.module.parameters()) == sum(p.numel() for p in model.parameters())
    assert fan_out(result.module) == {"relu": 9, "relu_1": 10}  # into the depthwise conv; into the linear layer


def test_ttrbr_restructuring_leaves_a_clipped_residual_neuron_clipped():
    from snnbench.conversion.restructure import restructure

    class ClippedResidual(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
            self.relu, self.relu6 = nn.ReLU(), nn.ReLU6()

        def forward(self, x):
            y = self.relu(self.conv1(x))
            return self.relu6(self.conv2(y) + y).mean((2, 3))

    torch.manual_seed(0)
    canonical, x = canonicalize(ClippedResidual()).module, torch.rand(2, 3, 8, 8) * 20
    split = restructure(canonical, "split", 2, x)
    assert isinstance(split.get_submodule("relu6"), ClippedReLU)
    with torch.no_grad():
        torch.testing.assert_close(split(x), canonical(x))
