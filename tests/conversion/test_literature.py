"""The literature's post-training methods: Li et al.'s calibration (threshold search, shift, bias and potential
corrections), SpikingJelly's local threshold balancing, and the presets built from existing methods (burst
spikes, signed neurons with memory), on tiny networks."""

from dataclasses import replace

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn

from snnbench.app import pipeline
from snnbench.app.cli import CONF_DIR
from snnbench.conversion.corrections import cancel_mean_error, correct_initial_potential, rate_of
from snnbench.conversion.methods import Context, calibration
from snnbench.core.calibrate import balance, calibrate, neuron_maxima, record_activations
from snnbench.core.graph import canonicalize
from snnbench.core.neurons import NeuronSpec
from snnbench.errors import UserError
from snnbench.methods import named
from snnbench.simulation.backend import spiking_layers
from snnbench.simulation.simulate import simulate


def config(*overrides):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def small_cnn():
    torch.manual_seed(0)
    return canonicalize(nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1),
                                      nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3))).module


def images(n=16, seed=1):
    return torch.rand(n, 1, 6, 6, generator=torch.Generator().manual_seed(seed))


def constant_currents(T, shape, seed=0):
    """Constant currents that put T x current half-way between two whole numbers (no floor is a near tie)."""
    levels = torch.randint(1, T - 3, shape, generator=torch.Generator().manual_seed(seed)).float()
    return ((levels + 0.5) / T).expand(T, *shape)


def test_bias_correction_removes_the_mean_rate_error_of_a_layer_fed_a_constant_current():
    T, threshold = 8, 1.0
    currents = constant_currents(T, (5, 3, 2, 2))
    spec = NeuronSpec(torch.tensor(threshold))
    rate = rate_of(spec, currents, T)
    offsets = torch.tensor([2.0, -1.0, 1.0]).view(1, 3, 1, 1) * threshold / T  # whole steps of the rate, per channel
    target = rate + offsets
    corrected, before = cancel_mean_error(spec, currents, target, rounds=1)
    assert before == pytest.approx(offsets.abs().mean().item())
    torch.testing.assert_close(corrected.bias, offsets.flatten())
    assert spec.bias is None  # a spec is never changed: the corrected one is another
    after = rate_of(corrected, currents, T) - target
    torch.testing.assert_close(after.transpose(0, 1).flatten(1).mean(1), torch.zeros(3), atol=1e-6, rtol=0)


def test_bias_correction_starts_from_the_bias_the_neuron_has():
    T = 8
    currents = constant_currents(T, (4, 3))
    spec = NeuronSpec(torch.tensor(1.0), bias=torch.tensor(0.5 / T))  # Li et al.'s shift, a scalar current
    target = rate_of(spec, currents, T) - 1.0 / T
    corrected, _ = cancel_mean_error(spec, currents, target, rounds=1)
    torch.testing.assert_close(corrected.bias, torch.full((3,), 0.5 / T - 1.0 / T))


def test_a_constant_current_fires_as_the_same_current_given_at_every_step():
    T = 8
    currents = constant_currents(T, (4, 3))
    spec = NeuronSpec(torch.tensor(0.7), v0=0.5)
    torch.testing.assert_close(rate_of(spec, currents[0], T, constant=True), rate_of(spec, currents, T))


def test_potential_correction_shifts_the_initial_membrane_by_the_measured_amount():
    T, threshold = 8, 2.0
    currents = constant_currents(T, (1, 2, 3, 3)) * threshold  # one image: its error is each neuron's own
    spec = NeuronSpec(torch.tensor(threshold), v0=0.25)
    rate = rate_of(spec, currents, T)
    steps = torch.randint(-1, 3, (1, 2, 3, 3), generator=torch.Generator().manual_seed(2)).float()
    target = rate + steps * threshold / T
    corrected, before = correct_initial_potential(spec, currents, target)
    assert before == pytest.approx((steps.abs() * threshold / T).mean().item())
    # the membrane starts T x the measured error (here `steps` thresholds) higher, per neuron
    assert corrected.v0.shape == (2, 3, 3)
    torch.testing.assert_close(corrected.v0 * threshold, 0.25 * threshold + steps[0] * threshold)
    torch.testing.assert_close(rate_of(corrected, currents, T), target)


@pytest.mark.parametrize("per_channel", [False, True])
def test_threshold_search_picks_the_candidate_with_the_least_clip_floor_error(per_channel):
    activation = torch.relu(torch.randn(8, 3, 5, 5, generator=torch.Generator().manual_seed(0))) * torch.tensor(
        [1.0, 3.0, 0.5]).view(1, 3, 1, 1)
    T = 4
    found = calibration.best_threshold(activation, T, per_channel)
    groups = [activation[:, c] for c in range(3)] if per_channel else [activation]
    for k, x in enumerate(groups):
        # oracle: their candidates and clip-floor error, one candidate at a time in Python
        candidates = [x.max().item() * (1 - 0.01 * i) for i in range(95)]
        errors = [((x - torch.floor(torch.clamp(x * T / c, 0, T)) * c / T) ** 2).mean().item() for c in candidates]
        assert (found[k] if per_channel else found).item() == pytest.approx(candidates[errors.index(min(errors))])
    assert found.shape == ((3,) if per_channel else ())


def test_calibration_averages_each_batch_threshold_with_momentum_and_shifts_the_input():
    model, batches, T = small_cnn(), [images(8, 1), images(8, 2), images(8, 3)], 6
    conversion = calibration.Calibration(bias_correction=False).convert(
        model, calibrate(model, batches, 99.9, False, "cpu"), batches, Context(T, 99.9, 0))
    for name, neuron in spiking_layers(conversion.snn).items():
        per_batch = [calibration.best_threshold(record_activations(model, [name], x)[name], T, False)
                     for x in batches]
        expected = 0.9 * (0.9 * per_batch[0] + 0.1 * per_batch[1]) + 0.1 * per_batch[2]
        torch.testing.assert_close(neuron.threshold, expected)
        torch.testing.assert_close(neuron.bias, neuron.threshold / (2 * T))  # theta / (2T) every step
        assert neuron.v0.item() == 0.0 and neuron.c_max == 1 and neuron.neg_threshold is None
    assert conversion.diagnostics == {}


@pytest.mark.parametrize("preset", ["calibration", "calibration_advanced"])
def test_calibrations_corrections_lower_the_first_layers_mean_error(preset):
    model, x, T = small_cnn(), images(64), 4
    method, context = named(preset, correction_images=64), Context(T, 99.9, 0)
    corrected = method.convert(model, calibrate(model, [x], 99.9, False, "cpu"), [x], context)
    plain = replace(method, bias_correction=False, potential_correction=False).convert(
        model, calibrate(model, [x], 99.9, False, "cpu"), [x], context)
    name = "1"  # the first ReLU: fed the image, a constant current

    def mean_error(snn):
        outputs = []
        hook = snn.get_submodule(name).register_forward_hook(lambda m, args, out: outputs.append(out.clone()))
        simulate(snn, [(x, torch.zeros(len(x), dtype=torch.long))], T, chunk=1)
        hook.remove()
        error = sum(outputs) / T - record_activations(model, [name], x)[name]
        per = error.transpose(0, 1).flatten(1).mean(1) if preset == "calibration" else error.mean(0)
        return per.abs().mean().item()

    assert mean_error(corrected.snn) < 0.5 * mean_error(plain.snn)
    key = "mean_error" if preset == "calibration" else "potential_error"
    assert set(corrected.diagnostics[name]) == {key}
    assert mean_error(plain.snn) == pytest.approx(corrected.diagnostics[name][key], rel=1e-4)


def test_local_threshold_balancing_grows_each_threshold_on_what_the_clipped_layers_below_give():
    model, batches = small_cnn(), [images(8, 1), images(8, 2)]
    result = balance(model, batches, per_channel=True, device="cpu")
    assert result.rule == "local_balancing" and result.percentile is None
    # oracle: the same network by hand, each ReLU clipped at its threshold as it grows
    conv1, conv2 = model.get_submodule("0"), model.get_submodule("2")
    theta1, theta2 = torch.zeros(4), torch.zeros(6)
    with torch.no_grad():
        for x in batches:
            a1 = torch.relu(conv1(x))
            theta1 = theta1 + 2 * torch.relu(a1 - theta1.view(1, -1, 1, 1)).mean((0, 2, 3))
            a2 = torch.relu(conv2(torch.minimum(a1, theta1.view(1, -1, 1, 1))))
            theta2 = theta2 + 2 * torch.relu(a2 - theta2.view(1, -1, 1, 1)).mean((0, 2, 3))
    torch.testing.assert_close(result.thresholds["1"], theta1)
    torch.testing.assert_close(result.thresholds["3"], theta2)
    per_layer = calibrate(model, batches[:1], 99.9, False, "cpu", rule="local_balancing")
    with torch.no_grad():
        expected = 2 * torch.relu(conv1(batches[0])).mean()
    torch.testing.assert_close(per_layer.thresholds["1"], expected)


def test_an_unknown_calibration_rule_is_refused_naming_the_choices():
    with pytest.raises(UserError, match="calibrate.rule must be one of percentile, local_balancing"):
        calibrate(small_cnn(), [images()], 99.9, False, "cpu", rule="max")


def test_signed_neurons_with_memory_get_each_neurons_largest_activation_as_threshold():
    model, batches = small_cnn(), [images(8, 1), images(8, 2)]
    conversion = named("snm").convert(model, calibrate(model, batches, 99.9, False, "cpu"), batches,
                                      Context(32, 99.9, 0))
    maxima = neuron_maxima(model, batches)
    for name, neuron in spiking_layers(conversion.snn).items():
        activations = torch.cat([record_activations(model, [name], x)[name] for x in batches])
        top = activations.amax(0)
        torch.testing.assert_close(neuron.threshold, torch.where(top > 0, top, top.max()))
        torch.testing.assert_close(neuron.threshold, maxima[name])
        assert (neuron.c_max, neuron.neg_threshold, neuron.require_positive_net) == (1, 1.0, True)
    # one value per neuron: the layer's threshold tensor has the shape of one image's activation
    assert spiking_layers(conversion.snn)["1"].threshold.shape == (4, 6, 6)


def test_burst_spikes_are_augmented_positive_spikes_of_at_most_gamma():
    model, x = small_cnn(), images()
    calibration_result = calibrate(model, [x], 99.9, False, "cpu")
    conversion = named("burst").convert(model, calibration_result, [x], Context(32, 99.9, 0))
    for name, neuron in spiking_layers(conversion.snn).items():
        assert (neuron.c_max, neuron.neg_threshold, neuron.v0.item()) == (2, None, 0.0)
        torch.testing.assert_close(neuron.threshold, calibration_result.thresholds[name])
    emitted = []
    hook = conversion.snn.get_submodule("1").register_forward_hook(lambda m, args, out: emitted.append(out))
    simulate(conversion.snn, [(x * 20, torch.zeros(len(x), dtype=torch.long))], 4, chunk=1)
    hook.remove()
    levels = torch.stack(emitted) / spiking_layers(conversion.snn)["1"].threshold
    assert levels.min() >= 0 and levels.max() == 2  # a strong input bursts, never more than Gamma per step


@pytest.mark.parametrize(("override", "message"), [
    ("method.thresholds=percentile", "method.thresholds must be one of mse, max"),
    ("method.momentum=1.0", r"method.momentum must be a number in \[0, 1\)"),
    ("method.correction_images=0", "method.correction_images must be a positive integer"),
    ("method.shift=maybe", "method.shift must be true or false"),
])
def test_calibration_knobs_are_checked(override, message):
    cfg = config("method=calibration", override)
    with pytest.raises(UserError, match=message):
        pipeline.validate(cfg)  # the method refuses the knob as the run builds it from cfg.method
