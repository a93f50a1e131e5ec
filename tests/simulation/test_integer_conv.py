from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from snnbench.conversion.methods import spiking_copy
from snnbench.conversion.restructure import restructure
from snnbench.core.graph import canonicalize, replace_modules
from snnbench.core.neurons import IFNeuron, SpikingGraph
from snnbench.models.convnet import ConvNet
from snnbench.models.resnet import ResNet
from snnbench.simulation.backend import spiking_layers, with_constant_currents
from snnbench.simulation.engines.int8 import Int8
from snnbench.simulation.integer_conv import (
    IntegerLayer,
    MapOrRows,
    coefficient_emitters,
    int8_conv_available,
    integer_modules,
    skippable_flattens,
    spike_fed_layers,
)
from snnbench.simulation.simulate import simulate

needs_int8 = pytest.mark.skipif(not int8_conv_available(), reason="this PyTorch has no oneDNN int8 convolution")


def coefficients(shape, low, high, rate, seed=0):
    generator = torch.Generator().manual_seed(seed)
    c = torch.randint(low, high + 1, shape, generator=generator).float()
    return c * (torch.rand(shape, generator=generator) < rate)


def relative_error(got, exact):
    return ((got.double() - exact).abs().max() / exact.abs().max()).item()


@needs_int8
@pytest.mark.parametrize("size", [12, 3, 2])  # 3 and 2: no more positions than taps, one dense matrix product
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("case", ["binary", "ternary", "augmented, pooled", "per-channel thresholds"])
def test_integer_convolution_is_as_near_the_exact_sum_as_float32(case, layout, size):
    torch.manual_seed(0)
    conv = nn.Conv2d(64, 32, 3, padding=1, stride=2 if case == "ternary" else 1)
    threshold = torch.rand(64) + 0.5 if case == "per-channel thresholds" else torch.tensor(0.37)
    neuron = IFNeuron(threshold, c_max=3 if case == "augmented, pooled" else 1,
                      neg_threshold=1.0 if case in ("ternary", "augmented, pooled") else None)
    c = coefficients((8, 64, size, size), -1 if case == "ternary" else 0, 1, 0.2)
    x = c * (threshold.view(-1, 1, 1) if threshold.dim() else threshold)
    area = 1
    if case == "augmented, pooled":
        area = 4
        x = F.avg_pool2d(coefficients((8, 64, 2 * size, 2 * size), -3, 3, 0.3) * threshold, 2)
    x = x.contiguous(memory_format=layout)
    exact = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), conv.stride, conv.padding)
    integer = IntegerLayer(conv, neuron, area)
    with torch.inference_mode():
        got = integer(x)
        float32 = conv(x)
    assert integer.matrix_product == (size < 4)
    assert got.shape == exact.shape
    # three int8 limbs carry as many bits as float32; int32 sums are exact: no worse than float32 summation
    assert relative_error(got, exact) <= max(2 * relative_error(float32, exact), 1e-7)


@needs_int8
@pytest.mark.parametrize("emits_coefficients", [False, True])
@pytest.mark.parametrize("flatten_skipped", [False, True])  # the map itself, read in channels-last order
def test_an_integer_linear_layer_after_a_flatten_takes_each_channels_threshold(emits_coefficients, flatten_skipped):
    threshold, linear = torch.rand(6) + 0.5, nn.Linear(6 * 3 * 3, 5)
    neuron = IFNeuron(threshold, emits_coefficients=emits_coefficients)
    c = coefficients((4, 6, 3, 3), 0, 1, 0.5).contiguous(memory_format=torch.channels_last)
    carried = c * threshold.view(-1, 1, 1)
    given = c if emits_coefficients else carried
    with torch.inference_mode():
        got = IntegerLayer(linear, neuron, 1)(given if flatten_skipped else given.flatten(1))
        torch.testing.assert_close(got, linear(carried.flatten(1)), rtol=1e-6, atol=1e-6)


def vgg_like():
    return ConvNet(layers=[8, "P", 16, 16, "P", 16], hidden=[12], in_channels=1, image_size=8, num_classes=4,
                   mean=[0.5], std=[0.5])


def converted(ann, **knobs):
    ann = canonicalize(ann).module
    thresholds = {name: torch.tensor(0.3 + 0.1 * i) for i, name in enumerate(
        n for n, m in ann.named_modules() if isinstance(m, nn.ReLU))}
    return spiking_copy(ann, thresholds, **knobs)


def test_layers_fed_by_neurons_directly_or_through_pooling_are_found():
    snn = converted(vgg_like())
    found = {name: source.pooling_area for name, source in spike_fed_layers(SpikingGraph(snn)).items()}
    # not features.0: the image feeds it; the classifier's linear layers: through a flatten, and directly
    assert found == {"features.4": 4, "features.7": 1, "features.11": 4, "classifier.1": 1, "classifier.4": 1}
    unbounded = converted(vgg_like(), c_max=None, neg_threshold=1.0)
    assert spike_fed_layers(SpikingGraph(unbounded)) == {}  # |c| has no bound
    wide = converted(vgg_like(), c_max=64)
    assert set(spike_fed_layers(SpikingGraph(wide))) == {"features.7", "classifier.1", "classifier.4"}  # 64 x 4 > 255


def test_resnet_convs_after_additions_and_split_neurons_keep_float():
    resnet = ResNet(8, in_channels=3, num_classes=10, mean=[0.5] * 3, std=[0.5] * 3)
    every_block_conv = {f"layer{s}.0.conv{k}" for s in (1, 2, 3) for k in (1, 2)}
    snn = converted(resnet)
    graph = SpikingGraph(snn)
    assert set(spike_fed_layers(graph)) == every_block_conv
    # a block's inner neuron feeds its conv2 alone; the others feed a conv and an addition too
    inner = {snn.get_submodule(f"layer{s}.0.relu1") for s in (1, 2, 3)}
    assert coefficient_emitters(graph, every_block_conv) == inner
    assert coefficient_emitters(graph, every_block_conv - {"layer2.0.conv2"}) == inner - {
        snn.get_submodule("layer2.0.relu1")}
    rewritten = restructure(canonicalize(resnet).module, "split", 2, torch.rand(2, 3, 32, 32))
    split = spiking_copy(rewritten, {name: torch.tensor(0.5) for name, module in rewritten.named_modules()
                                     if isinstance(module, nn.ReLU)})
    # a block's conv1 is fed the previous block's split neuron (its copies summed), except the stem's neuron
    assert set(spike_fed_layers(SpikingGraph(split))) == {"layer1.0.conv1", "layer1.0.conv2", "layer2.0.conv2",
                                                          "layer3.0.conv2"}


def spiking_vgg(**knobs):
    torch.manual_seed(2)
    return converted(vgg_like(), **knobs)


def active_vgg(**knobs):
    """spiking_vgg with mostly positive weights, so that every layer spikes within a few steps."""
    snn = spiking_vgg(**knobs)
    for layer in snn.modules():
        if isinstance(layer, nn.Conv2d | nn.Linear):
            layer.weight.data = layer.weight.abs() - 0.5 * layer.weight.abs().mean()
    return snn


def image_batches(n=2, batch=5):
    torch.manual_seed(1)
    return [(torch.rand(batch, 1, 8, 8), torch.randint(0, 4, (batch,))) for _ in range(n)]


@needs_int8
@pytest.mark.parametrize("knobs", [{}, {"neg_threshold": 1.0}, {"c_max": 4, "neg_threshold": 1.0, "v0": 0.5}])
def test_integer_engine_equals_itself_step_by_step(knobs):
    data, T = image_batches(), 9
    step_by_step = simulate(active_vgg(**knobs), data, T, 1, layout=torch.channels_last, engine=Int8(min_depth=0))
    reference = simulate(active_vgg(**knobs), data, T, 1, layout=torch.channels_last, engine="reference")
    for chunk in (2, 4, 9):
        folded = simulate(active_vgg(**knobs), data, T, chunk, layout=torch.channels_last,
                          engine=Int8(min_depth=0))
        assert torch.equal(folded.correct, step_by_step.correct)
        for name in step_by_step.events:
            assert torch.equal(folded.events[name], step_by_step.events[name])
            assert torch.equal(folded.units[name], step_by_step.units[name])
    # the same network as the float reference: the integer sums may flip a spike at a threshold, not the picture
    assert (step_by_step.correct - reference.correct).abs().max() <= 1


@needs_int8
@pytest.mark.parametrize("knobs", [{}, {"neg_threshold": 1.0}, {"c_max": 4, "neg_threshold": 1.0, "v0": 0.5}])
def test_integer_layers_and_emitted_coefficients_compute_what_the_float_network_does(knobs):
    snn, (images, _) = active_vgg(**knobs), image_batches(1)[0]

    def run(replacements):
        module = with_constant_currents(SpikingGraph(snn).with_modules(replacements(SpikingGraph(snn))), "direct")
        neurons = spiking_layers(module).values()
        for neuron in neurons:
            neuron.begin(6)
            neuron.next_chunk(6)
        with torch.inference_mode():
            return module(images), neurons
    floats, neurons = run(lambda graph: {})
    assert all(neuron.events[-1] > 0 for neuron in neurons) and not any(n.emits_coefficients for n in neurons)
    integers, neurons = run(integer_modules)
    assert all(neuron.emits_coefficients for neuron in neurons)  # every neuron here feeds integer layers only
    torch.testing.assert_close(integers, floats, rtol=1e-5, atol=1e-5)
    assert not any(neuron.emits_coefficients for neuron in spiking_layers(snn).values())  # the network's own


class SharedPooling(nn.Module):
    """One pooling module after two neurons: the first feeds an integer conv alone, the second a mean too."""

    def __init__(self):
        super().__init__()
        self.conv1, self.neuron1 = nn.Conv2d(1, 8, 3, padding=1), IFNeuron(torch.tensor(0.3))
        self.pool, self.conv2 = nn.AvgPool2d(2), nn.Conv2d(8, 8, 3, padding=1)
        self.neuron2 = IFNeuron(torch.tensor(0.2))
        self.linear = nn.Linear(8 * 2 * 2, 4)
        for layer in (self.conv1, self.conv2, self.linear):
            layer.weight.data = layer.weight.abs() - 0.5 * layer.weight.abs().mean()

    def forward(self, x):
        spikes = self.neuron2(self.conv2(self.pool(self.neuron1(self.conv1(x)))))
        return self.linear(self.pool(spikes).flatten(1)) + spikes.mean()


@needs_int8
def test_poolings_after_emitting_neurons_sum_and_a_shared_one_keeps_averaging():
    (images, _), outputs = image_batches(1)[0], []
    for integer in (False, True):
        torch.manual_seed(0)
        snn = SharedPooling()
        replacements = integer_modules(SpikingGraph(snn)) if integer else {}
        module = with_constant_currents(SpikingGraph(snn).with_modules(replacements), "direct")
        for neuron in spiking_layers(module).values():
            neuron.begin(4)
            neuron.next_chunk(4)
        with torch.inference_mode():
            outputs.append(module(images))
        if integer:
            assert replacements["neuron1"].emits_coefficients and "neuron2" not in replacements
            assert "pool" not in replacements and not replacements["conv2"].summed
        assert module.neuron2.events.sum() > 0
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-5)
    vgg = spiking_vgg()
    replacements = integer_modules(SpikingGraph(vgg))
    assert replacements["features.4"].summed and replacements["features.3"].divisor_override == 1


def test_only_flattens_that_feed_integer_linear_layers_alone_are_skipped():
    snn = spiking_vgg()
    layer = snn.get_submodule
    assert skippable_flattens(SpikingGraph(snn), {"classifier.1": layer("classifier.1")}) == {layer("classifier.0")}
    assert skippable_flattens(SpikingGraph(snn), {"features.11": layer("features.11")}) == set()
    spiking = nn.Sequential(nn.Flatten(), IFNeuron(torch.tensor(0.5)), nn.Linear(4, 2))  # a neuron between
    assert skippable_flattens(SpikingGraph(spiking), {"2": spiking[2]}) == set()


@needs_int8
def test_the_int8_engine_computes_with_modules_of_its_own_and_leaves_the_networks_alone():
    snn = spiking_vgg()
    modules = dict(snn.named_modules())
    replacements = integer_modules(SpikingGraph(snn))
    assert isinstance(replacements["features.4"], IntegerLayer) and isinstance(replacements["classifier.0"], MapOrRows)
    simulate(snn, image_batches(), 3, 2, engine="int8")
    assert dict(snn.named_modules()) == modules
    assert all("forward" not in module.__dict__ for module in snn.modules())
    assert not any(neuron.emits_coefficients for neuron in spiking_layers(snn).values())


def test_only_convs_deep_enough_compute_in_integers():
    graph = SpikingGraph(spiking_vgg())

    def integer_convs(min_depth):
        return {name for name, module in integer_modules(graph, min_depth).items()
                if isinstance(module, IntegerLayer) and isinstance(module.layer, nn.Conv2d)}
    assert integer_convs(100) == {"features.7", "features.11"}  # 16 channels x 9 taps; features.4 has 8 x 9 = 72
    assert integer_convs(0) == {"features.4", "features.7", "features.11"}
    assert integer_modules(graph, 10_000) == {}


class NeuronOutsideItsLayersBlock(nn.Module):
    """A neuron at the top level between two convs of one block: its integer conv (a module of the int8 engine's
    graph that holds the neuron) comes before the neuron itself in the module tree."""

    def __init__(self):
        super().__init__()
        self.block = nn.Module()
        self.block.conv1, self.block.conv2 = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.neuron, self.last = IFNeuron(torch.tensor(0.2)), IFNeuron(torch.tensor(0.3))
        self.linear = nn.Linear(8 * 8 * 8, 4)

    def forward(self, x):
        return self.linear(self.last(self.block.conv2(self.neuron(self.block.conv1(x)))).flatten(1))


@needs_int8
def test_every_neuron_is_counted_wherever_the_engines_graph_holds_it():
    data = image_batches()
    torch.manual_seed(0)
    reference = simulate(NeuronOutsideItsLayersBlock(), data, 6, 1, engine="reference")
    torch.manual_seed(0)
    integer = simulate(NeuronOutsideItsLayersBlock(), data, 6, 3, engine=Int8(min_depth=0))
    assert set(integer.events) == set(reference.events) == {"neuron", "last"}
    assert reference.events["neuron"].sum() > 0
    assert torch.equal(integer.events["neuron"], reference.events["neuron"])


def test_layers_fed_by_neurons_with_a_threshold_per_neuron_stay_in_float():
    snn = converted(vgg_like())
    per_neuron = replace(snn.get_submodule("features.2").spec, threshold=torch.full((8, 8, 8), 0.5))  # as snm's
    snn = replace_modules(snn, {"features.2": IFNeuron.built(per_neuron)})
    found = spike_fed_layers(SpikingGraph(snn))
    assert "features.4" not in found and "features.7" in found
