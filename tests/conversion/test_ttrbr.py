"""TTRBR on a random tiny ResNet: the block rewrites keep the ANN's logits, each tuned threshold is the best
candidate on what the simulated layer receives, and the diagnostics measure what docs/methods.md defines."""

import operator
from dataclasses import replace

import pytest
import torch
import torchvision
from networks import canonical_resnet, rgb_images, tiny_resnet
from user_models import Mixed

from snnbench.conversion.methods import Context, spiking_copy, ttrbr
from snnbench.conversion.restructure import KINDS, SplitReLU, restructure
from snnbench.core.calibrate import calibrate, record_activations
from snnbench.core.graph import canonicalize, spiking_layer_names, trace
from snnbench.core.neurons import IFNeuron
from snnbench.errors import UserError
from snnbench.simulation.simulate import simulate


@pytest.mark.parametrize("kind", KINDS)
def test_restructuring_keeps_the_ann_logits(kind):
    model, x = canonical_resnet(), rgb_images()
    rewritten = restructure(model, kind, 2, x)
    with torch.no_grad():
        torch.testing.assert_close(rewritten(x), tiny_resnet()(x), atol=1e-4, rtol=1e-4)
    added = {"none": 0, "shortcut_neuron": 3, "merged": 0, "split": 0}[kind]  # one shortcut neuron per block
    assert len(spiking_layer_names(rewritten)) == len(spiking_layer_names(model)) + added
    additions = [n for n in trace(rewritten).graph.nodes if n.op == "call_function" and n.target is operator.add]
    if kind == "merged":  # the shortcut really goes through relu1: no residual addition is left
        assert additions == []
    else:
        assert len(additions) >= 3


@pytest.mark.parametrize("copies", [1, 2, 4])
def test_split_neurons_round_their_input_sum_to_a_kth_of_the_threshold(copies):
    theta, T = 2.0, 8
    currents = torch.linspace(-0.4, 2.4, 57)  # never a tie between two rounding levels
    split = SplitReLU(channels=57, copies=copies)
    split.relu = IFNeuron(torch.full((57 * copies,), theta / copies), v0=split.phases(0.5))
    split.relu.begin(T)
    split.relu.next_chunk(T)
    emitted = split(currents.expand(T, -1)).sum(0)
    levels = torch.floor(copies * T * currents / theta + 0.5).clamp(0, copies * T)
    torch.testing.assert_close(emitted, theta / copies * levels)


def test_ttrbr_split_staggers_the_copies_of_every_post_addition_neuron():
    model, x = canonical_resnet(), rgb_images(32)
    method = ttrbr.TTRBR(restructure="split", copies=2)
    conversion = method.convert(model, calibrate(model, [x], 99.9, True, "cpu"), [x], Context(8, 99.9, 0))
    neuron = conversion.snn.get_submodule("layer2.0.relu2.relu")
    channels = conversion.snn.get_submodule("layer2.0.conv2").out_channels
    assert neuron.v0.tolist() == [0.25] * channels + [0.75] * channels
    assert len(conversion.diagnostics) == len(spiking_layer_names(model))


@pytest.mark.parametrize("neg_threshold", [None, 1.0])  # binary IF, and with TerMapping's negative spike
def test_each_threshold_is_the_best_candidate_on_the_currents_from_the_tuned_layers_below(neg_threshold):
    x, T, scales = rgb_images(), 6, [0.5, 0.8, 1.0, 1.3]
    model = restructure(canonical_resnet(), "shortcut_neuron", 2, x)
    thresholds = calibrate(model, [x], 99.9, False, "cpu").thresholds
    snn = spiking_copy(model, thresholds, v0=0.5, neg_threshold=neg_threshold)
    tuned, diagnostics = ttrbr.tune(snn, model, x, scales, T, per_channel=False)
    assert len({d["threshold_scale"] for d in diagnostics.values()}) > 1  # the choice is not the same everywhere
    name = "layer2.0.relu2"
    # the tuned network has new neurons built from the tuned specs; the network tuned keeps its own
    assert torch.equal(snn.get_submodule(name).threshold, thresholds[name])
    assert torch.equal(tuned.get_submodule(name).threshold, thresholds[name] * diagnostics[name]["threshold_scale"])
    # oracle: the tuned network run step by step; the layer's own neuron, one step per call, on what it receives
    seen = []
    hook = tuned.get_submodule(name).register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    simulate(tuned, [(x, torch.zeros(len(x), dtype=torch.long))], T, chunk=1)
    hook.remove()
    target = record_activations(model, [name], x)[name]

    def error(scale):
        neuron = IFNeuron(thresholds[name] * scale, v0=0.5, neg_threshold=neg_threshold)
        neuron.begin(T)
        rate = sum(neuron(current) for current in seen) / T
        return ((rate - target) ** 2).mean().item()

    errors = [error(scale) for scale in scales]
    assert diagnostics[name]["threshold_scale"] == scales[errors.index(min(errors))]
    assert diagnostics[name]["error_rms"] == pytest.approx(min(errors) ** 0.5, rel=1e-4)


@pytest.mark.parametrize("per_channel", [False, True])
def test_tuning_lowers_every_layers_measured_error(per_channel):
    model = canonical_resnet()
    x = rgb_images(32)
    calibration = calibrate(model, [x], 99.9, False, "cpu")
    T = 8
    method = ttrbr.TTRBR(restructure="none", per_channel=per_channel)
    tuned = method.convert(model, calibration, [x], Context(T, 99.9, 0))
    fixed = replace(method, tune=False).convert(model, calibration, [x], Context(T, 99.9, 0))
    for name, diagnostics in tuned.diagnostics.items():
        threshold = tuned.snn.get_submodule(name).threshold
        assert threshold.dim() == (1 if per_channel else 0)
        assert min(method.scales) <= diagnostics["threshold_scale"] <= max(method.scales)
        # with v0 = 0.5 a constant current is rounded: the quantization error is at most threshold / (2T)
        assert diagnostics["quantization_rms"] <= threshold.max().item() / (2 * T) + 1e-6
        assert fixed.diagnostics[name]["threshold_scale"] == 1.0
    # the first layer sees the same (constant) input either way, so tuning can only lower its error
    assert tuned.diagnostics["relu"]["error_rms"] <= fixed.diagnostics["relu"]["error_rms"]
    # layer by layer the greedy choice wins on average over the network
    mean = {k: sum(d["error_rms"] for d in net.diagnostics.values()) for k, net in (("t", tuned), ("f", fixed))}
    assert mean["t"] < mean["f"]


def test_mean_correction_cancels_each_channels_mean_rate_error():
    model, x, T = canonical_resnet(), rgb_images(32), 8
    calibration = calibrate(model, [x], 99.9, True, "cpu")
    method = ttrbr.TTRBR(restructure="none", correct_mean=True)
    conversion = method.convert(model, calibration, [x], Context(T, 99.9, 0))
    snn = conversion.snn
    # oracle: the converted network run step by step; the first layer's rate against the ANN, per channel
    name, outputs = "relu", []
    hook = snn.get_submodule(name).register_forward_hook(lambda m, args, out: outputs.append(out.clone()))
    simulate(snn, [(x, torch.zeros(len(x), dtype=torch.long))], T, chunk=1)
    hook.remove()
    error = sum(outputs) / T - record_activations(model, [name], x)[name]
    corrected = error.transpose(0, 1).flatten(1).mean(1).abs().mean().item()
    assert snn.get_submodule(name).bias.shape == (error.shape[1],)
    assert corrected < 0.3 * conversion.diagnostics[name]["mean_error"]


def test_split_rewrites_every_neuron_fed_by_an_addition_in_any_residual_network():
    model = torchvision.models.resnet18(num_classes=10).eval()
    canonical, x = canonicalize(model, "avg").module, torch.rand(2, 3, 32, 32)
    rewritten = restructure(canonical, "split", 2, x)
    splits = [name for name, module in rewritten.named_modules() if isinstance(module, SplitReLU)]
    assert len(splits) == 8  # the second ReLU call of each BasicBlock, after its addition
    assert all(name.endswith("relu_call2") for name in splits)
    with torch.no_grad():
        torch.testing.assert_close(rewritten(x), canonical(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["shortcut_neuron", "merged"])
def test_rewrites_of_option_a_blocks_are_refused_where_a_shortcut_computes(kind):
    canonical, x = canonicalize(Mixed(in_channels=3).eval()).module, torch.rand(2, 3, 16, 16)
    with pytest.raises(UserError, match=rf"method.restructure={kind} .*relu_4.*use method.restructure=split or none"):
        restructure(canonical, kind, 2, x)
    plain = canonicalize(torchvision.models.vgg11_bn(num_classes=10).eval(), "avg").module
    with pytest.raises(UserError, match="has none: use method.restructure=none"):
        restructure(plain, kind, 2, x)
