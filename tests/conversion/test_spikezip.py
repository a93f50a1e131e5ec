"""SpikeZIP-TF (You et al., ICML 2024): the quantiser, the quantised network trained where conversion puts neurons
(train.activation=spikezip), its spike-tracer neurons (method=spikezip), and the equivalence the paper claims: the
spiking network reaches the quantised ANN's outputs once its neurons settle."""

import json

import pandas as pd
import pytest
import torch
from helpers import TESTS, snnbench
from networks import HandWrittenAttention, mean_outputs, tiny_vit

import snnbench as api
from snnbench.app.train import spikezip_network, with_activation
from snnbench.conversion.methods import Context
from snnbench.conversion.methods.spikezip import SpikeTracerNeuron, SpikeZIP
from snnbench.core.analog import Reencode
from snnbench.core.calibrate import calibrate
from snnbench.core.graph import canonicalize, spiking_layer_names
from snnbench.errors import UserError
from snnbench.models.spikezip import SpikeZIPQuantizer
from snnbench.simulation.simulate import simulate


def test_the_quantiser_rounds_into_its_levels_with_straight_through_gradients():
    signed, unsigned = SpikeZIPQuantizer(8, signed=True, scale=0.5), SpikeZIPQuantizer(8, signed=False, scale=0.5)
    assert (signed.low, signed.high, unsigned.low, unsigned.high) == (-4, 3, 0, 7)
    x = torch.tensor([-3.0, -0.8, -0.1, 0.2, 0.3, 1.1, 2.9], requires_grad=True)
    torch.testing.assert_close(signed(x), 0.5 * torch.tensor([-4.0, -2, 0, 0, 1, 2, 3]), rtol=0, atol=0)
    torch.testing.assert_close(unsigned(x), 0.5 * torch.tensor([0.0, 0, 0, 0, 1, 2, 6]), rtol=0, atol=0)
    signed(x).sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([0.0, 1, 1, 1, 1, 1, 0]))  # none outside the clamp
    assert signed.scale.grad is not None and signed.scale.grad.item() != 0


def st_bif(means: torch.Tensor, threshold: float, low: int, high: int) -> torch.Tensor:
    """SpikeZIP-TF's ST-BIF as the paper states it, written apart from snnbench's neuron: fed at step t the increment
    of the mean input, membrane from threshold / 2, one spike a step within the net count's range [low, high];
    the net count after each step, [T, ...]."""
    membrane, count, counts, previous = torch.full_like(means[0], 0.5), torch.zeros_like(means[0]), [], 0
    for mean in means:
        membrane = membrane + (mean - previous) / threshold
        previous = mean
        spike = ((membrane >= 1) & (count < high)).float() - ((membrane < 0) & (count > low)).float()
        membrane, count = membrane - spike, count + spike
        counts.append(count)
    return torch.stack(counts)


def test_the_neuron_is_the_st_bif_on_the_mean_input_and_settles_to_the_quantised_value():
    torch.manual_seed(0)
    T, threshold = 24, 0.3
    currents = torch.randn(T, 50) * 0.8 + torch.randn(50)  # varying inputs, means of both signs
    neuron = SpikeTracerNeuron(torch.tensor(threshold), low=-4, high=3)
    neuron.begin(T)
    emitted = torch.stack([neuron(current[None])[0] for current in currents])
    means = currents.cumsum(0) / torch.arange(1, T + 1)[:, None]
    counts = st_bif(means, threshold, -4, 3)
    t = torch.arange(1, T + 1)[:, None]
    # each layer's output summed to t is t times the ST-BIF's value: its mean is the ST-BIF's net count x threshold
    torch.testing.assert_close(emitted.cumsum(0) / t, counts * threshold)
    assert (counts.diff(dim=0).abs() <= 1).all() and counts.min() == -4 and counts.max() == 3
    neuron.begin(T)  # a constant input: it settles to the quantiser's value of that input
    for _ in range(T):
        out = neuron(currents[0][None])[0]
    quantiser = SpikeZIPQuantizer(8, signed=True, scale=threshold)
    torch.testing.assert_close(out / threshold, neuron.net[0])  # settled: it emits its count every step
    with torch.no_grad():
        torch.testing.assert_close(neuron.net[0] * threshold, quantiser(currents[0]))
    assert neuron.units[-1] == neuron.net.abs().sum() and neuron.events.max() <= 50


def quantised(model, images, levels=8):
    """SpikeZIP-TF's quantised network of `model`, each step set from the maximum of its input on `images`, and its
    canonical network."""
    canonical = canonicalize(model, nonlinear="compensate").module
    maxima = calibrate(canonical, [images], 100, False, "cpu").thresholds
    network = spikezip_network(model, levels, {name: value.item() for name, value in maxima.items()}).eval()
    return network, canonicalize(network, nonlinear="compensate").module


def converted(ann, images):
    return SpikeZIP().convert(ann, calibrate(ann, [images], 99.9, False, "cpu"), [images], Context(16, 99.9, 0)).snn


def test_the_quantisers_sit_where_conversion_puts_neurons_and_the_network_canonicalises_into_itself():
    images = torch.rand(4, 1, 8, 8)
    model = tiny_vit()
    network, ann = quantised(model, images)
    encoders = {name: module for name, module in canonicalize(model, nonlinear="compensate").module.named_modules()
                if isinstance(module, Reencode)}
    assert spiking_layer_names(ann) == spiking_layer_names(network) and sorted(spiking_layer_names(ann)) == sorted(
        encoders)
    quantizers = {name: network.get_submodule(name) for name in encoders}
    assert all(isinstance(q, SpikeZIPQuantizer) for q in quantizers.values())
    assert sorted(name for name, q in quantizers.items() if not q.signed) == [
        f"encoder.layers.encoder_layer_{block}.self_attention.softmax_spikes" for block in (0, 1)]
    with torch.no_grad():
        torch.testing.assert_close(ann(images), network(images), rtol=0, atol=0)
    again = spikezip_network(model, 8, {})  # what a checkpoint loads into: the same keys, the learnt steps too
    again.load_state_dict(network.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(images), network(images), rtol=0, atol=0)


@pytest.mark.parametrize("model", [tiny_vit(), HandWrittenAttention()], ids=["torchvision_vit", "hand_written"])
def test_the_spiking_network_reaches_the_quantised_anns_outputs(model):
    torch.manual_seed(1)
    images = torch.rand(8, 1, 8, 8)
    network, ann = quantised(model, images)
    snn = converted(ann, images)
    assert all(isinstance(m, SpikeTracerNeuron) for m in snn.modules() if hasattr(m, "threshold"))
    with torch.no_grad():
        logits = network(images)
    errors = {T: (mean_outputs(snn, images, T) - logits).abs().max().item() for T in (1, 4, 32, 64)}
    assert errors[1] > 0.01 and errors[4] > 0.01  # the neurons have not settled yet
    assert errors[32] < 1e-5 and errors[64] < 1e-5  # settled: the quantised ANN, to float rounding


@pytest.mark.parametrize("chunk, coding", [(1, "direct"), (4, "direct"), (4, "poisson")])
def test_the_torch_engine_counts_what_the_reference_engine_counts(chunk, coding):
    torch.manual_seed(2)
    images = torch.rand(10, 1, 8, 8)
    _, ann = quantised(tiny_vit(classes=3), images)
    snn = converted(ann, images)
    labels = torch.randint(0, 3, (10,), generator=torch.Generator().manual_seed(0))
    batches = [(images[:6], labels[:6]), (images[6:], labels[6:])]
    torch_run = simulate(snn, batches, 20, chunk, coding=coding, engine="torch")
    reference = simulate(snn, batches, 20, 1, coding=coding, engine="reference")
    assert torch.equal(torch_run.correct, reference.correct) and 0 < reference.correct.sum() < 20 * 10
    for name in reference.events:
        assert torch.equal(torch_run.events[name], reference.events[name]), name
        assert torch.equal(torch_run.units[name], reference.units[name]), name
    for name in reference.products:
        assert torch.equal(torch_run.products[name], reference.products[name]), name


def test_the_recipe_refuses_too_few_levels(cfg):
    cfg.train.activation, cfg.train.spikezip_levels = "spikezip", 3
    with pytest.raises(UserError, match="train.activation=spikezip needs train.spikezip_levels"):
        with_activation(tiny_vit(), cfg.train)


def test_method_spikezip_needs_the_analog_operators():
    images = torch.rand(4, 1, 8, 8)
    network, _ = quantised(tiny_vit(), images)
    with pytest.raises(UserError, match="method=spikezip computes the nonlinear operations as analog operators"):
        api.convert(network, "spikezip", images, T=4)
    converted_network = api.convert(network, "spikezip", images, T=4, nonlinear="compensate")
    assert isinstance(converted_network.snn.get_submodule("encoder.ln_spikes"), SpikeTracerNeuron)


def test_method_spikezip_refuses_a_network_not_trained_quantised():
    images = torch.rand(4, 1, 8, 8)
    ann = canonicalize(tiny_vit(), nonlinear="compensate").module
    with pytest.raises(UserError, match="is no SpikeZIP-TF quantiser"):
        converted(ann, images)
    with pytest.raises(UserError, match="method=spikezip converts the quantised ANN of SpikeZIP-TF"):
        SpikeZIP(trained_with=None)


@pytest.mark.parametrize("overrides, message", [
    (("convert.nonlinear=compensate",), "error: method=spikezip converts the quantised ANN of SpikeZIP-TF: add "
     "train.activation=spikezip train.spikezip_levels=16 (and train.init_checkpoint=<weights> to fine-tune a "
     "trained network)"),
    (("train.activation=spikezip", "train.spikezip_levels=16"), "error: train.activation=spikezip trains "
     "quantisers where convert.nonlinear=compensate puts spiking layers, around LayerNorm, GELU, softmax and "
     "attention: add convert.nonlinear=compensate"),
    (("convert.nonlinear=compensate", "train.activation=spikezip"), "error: train.activation=spikezip needs "
     "train.spikezip_levels, the quantisation levels (an integer of at least 4: a signed quantiser has levels/2 - 1 "
     "positive ones), got None: e.g. train.spikezip_levels=16"),
])
def test_bad_spikezip_runs_are_refused_in_one_line(tmp_path, overrides, message):
    out = tmp_path / "run"
    done = snnbench("run", "method=spikezip", *overrides, f"hydra.run.dir={out}", f"cache_dir={tmp_path / 'cache'}",
                    in_process=True)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == message
    assert not (out / "summary.json").exists()


def test_a_spikezip_run_trains_quantised_and_its_snn_reaches_the_ann(tmp_path):
    """End to end: the quantised ViT trained by the run, converted, simulated until its neurons settle: the spiking
    network's accuracy at T is the quantised ANN's."""
    out = tmp_path / "run"
    done = snnbench("run", "model=custom", "model._target_=networks.digits_vit", "dataset=digits",
                    "convert.nonlinear=compensate", "train.activation=spikezip", "train.spikezip_levels=8",
                    "method=spikezip", "sim.T=40", "train.epochs=1", "sim.num_samples=40", f"hydra.run.dir={out}",
                    f"cache_dir={tmp_path / 'cache'}", cwd=TESTS)
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["snn_accuracy"] == summary["ann_accuracy"] > 0.1
    accuracy = pd.read_csv(out / "accuracy.csv")
    assert accuracy.events_per_image.is_monotonic_increasing and accuracy.events_per_image.iloc[-1] > 0
    layers = pd.read_csv(out / "layers.csv")
    quantizers = layers[layers.kind.str.startswith("spiking")]
    assert len(quantizers) == 17 and (quantizers.threshold > 0).all()
