import math
from dataclasses import replace

import pytest
import torch

from snnbench.core.neurons import IFNeuron, capped_at_clip


def run(neuron: IFNeuron, currents: torch.Tensor) -> torch.Tensor:
    """Feed currents [T, N] step by step; return the emitted values [T, N]."""
    T, n = currents.shape
    neuron.begin(T)
    neuron.next_chunk(1)
    return torch.stack([neuron(currents[t]) for t in range(T)])


@pytest.mark.parametrize("v0", [0.0, 0.5])
@pytest.mark.parametrize("T", [4, 16, 64, 256])
def test_binary_rate_converges_to_clipped_input(T, v0):
    theta = 0.8
    x = torch.linspace(-0.5, 1.5, 101)
    rate = run(IFNeuron(theta, v0=v0), x.expand(T, -1)).sum(0) / T
    assert (rate - x.clamp(0, theta)).abs().max() <= theta / T + 1e-6


def test_ternary_net_count_never_negative_and_undoes_over_firing():
    torch.manual_seed(0)
    currents = torch.randn(200, 500)
    neuron = IFNeuron(1.0, neg_threshold=1.0)
    out = run(neuron, currents)
    assert (out.cumsum(0) >= -1e-6).all()           # the running output never goes negative
    assert (out < 0).any()
    # a negative spike only after the neuron has fired more than it undid
    net_before = torch.cat([torch.zeros(1, 500), out.cumsum(0)[:-1]])
    assert (net_before[out < 0] > 0).all()


def test_negative_spike_corrects_transient_over_firing():
    # +1.2 then -1.2: the ANN sees mean 0; binary IF keeps its spike, ternary takes it back
    currents = torch.tensor([[1.2], [-1.2], [0.0], [0.0]])
    assert run(IFNeuron(1.0), currents).sum() == 1.0
    assert run(IFNeuron(1.0, neg_threshold=1.0), currents).sum() == 0.0


def test_augmented_neuron_at_T1_is_the_quantiser():
    theta = torch.tensor(0.3)
    a = torch.linspace(0, 5, 1001)
    out = run(IFNeuron(theta, c_max=None, neg_threshold=1.0), a[None])
    # floor of the exact quotient (so the membrane residue a - c*theta is never negative)
    torch.testing.assert_close(out[0], theta * torch.div(a, theta, rounding_mode="floor"))
    assert (a - out[0] >= 0).all() and (a - out[0] < theta).all()


def spec_rule(currents, theta, v0, c_max, neg_threshold, require_positive_net):
    """docs/methods.md's update rule written out scalar by scalar, for one neuron."""
    v, net, out = v0 * theta, 0, []
    for current in currents:
        v += current
        limit = c_max or math.inf
        if v >= theta:
            c = min(math.floor(v / theta), limit)
        elif neg_threshold is not None and v <= -neg_threshold * theta and (net > 0 or not require_positive_net):
            # at least one spike, so that c_max = 1 is TerMapping's "emit -theta" also for neg_threshold < 1
            c = -min(max(math.floor(-v / theta), 1), net if require_positive_net else math.inf, limit)
        else:
            c = 0
        v -= c * theta
        net += c
        out.append(c * theta)
    return out


@pytest.mark.parametrize("c_max", [1, 2, None])
@pytest.mark.parametrize("neg_threshold", [None, 0.5, 1.0, 2.0])
@pytest.mark.parametrize(("v0", "require_positive_net"), [(0.0, True), (0.5, True), (0.0, False)])
def test_neuron_follows_the_spec_rule_exactly(c_max, neg_threshold, v0, require_positive_net):
    # dyadic currents and threshold: float32 and Python floats compute the same values exactly
    torch.manual_seed(1)
    theta = 0.5
    currents = torch.randint(-96, 128, (48, 40)) / 64
    out = run(IFNeuron(theta, v0=v0, c_max=c_max, neg_threshold=neg_threshold,
                       require_positive_net=require_positive_net), currents)
    expected = [spec_rule(currents[:, i].tolist(), theta, v0, c_max, neg_threshold, require_positive_net)
                for i in range(currents.shape[1])]
    assert out.T.tolist() == expected
    assert (out < 0).any() == (neg_threshold is not None)


@pytest.mark.parametrize("T", [1, 4, 32])
def test_augmented_rate_tracks_activation_without_the_one_spike_ceiling(T):
    theta = 0.25
    x = torch.linspace(0, 3, 61)                     # up to 12 thresholds per step
    rate = run(IFNeuron(theta, c_max=None, neg_threshold=1.0), x.expand(T, -1)).sum(0) / T
    assert (rate - x).abs().max() <= theta / T + 1e-6
    binary = run(IFNeuron(theta), x.expand(T, -1)).sum(0) / T
    assert binary.max() <= theta + 1e-6             # the binary neuron saturates at one spike per step


def test_counters_count_events_and_spike_units():
    neuron = IFNeuron(1.0, c_max=None)
    run(neuron, torch.tensor([[3.5, 0.2, 1.0]]))
    assert neuron.events.tolist() == [2.0]
    assert neuron.units.tolist() == [4.0]


@pytest.mark.parametrize("neg_threshold", [None, 1.0])
def test_a_neuron_that_emits_its_coefficients_emits_them_whole(neg_threshold):
    neuron = IFNeuron(1.0, c_max=4, neg_threshold=neg_threshold, emits_coefficients=True)
    assert run(neuron, torch.tensor([[3.5, 0.25, 1.0, 9.0]])).tolist() == [[3.0, 0.0, 1.0, 4.0]]
    assert neuron.events.tolist() == [3.0] and neuron.units.tolist() == [8.0]
    assert neuron.v.tolist() == [0.5, 0.25, 0.0, 5.0]


@pytest.mark.parametrize("c_max", [1, 4, None])
def test_a_clipped_relus_neuron_converges_to_the_clipped_activation(c_max):
    # calibrated above the clip (a threshold scale, a percentile of a layer that saturates): capped_at_clip keeps
    # the rate at most the clip, and the rate of a constant input converges to min(max(x, 0), clip)
    clip, x = 6.0, torch.linspace(-3.0, 12.0, 151)
    threshold, most = capped_at_clip(torch.tensor(9.0), c_max, clip)
    assert threshold == clip and most == 1
    errors = {}
    for T in (16, 64, 256):
        rate = run(IFNeuron(threshold, c_max=most), x.expand(T, -1)).sum(0) / T
        assert rate.max() <= clip
        errors[T] = (rate - x.clamp(0, clip)).abs().max().item()
        assert errors[T] <= clip / T + 1e-5
    assert errors[256] < errors[16]
    # below the clip a multi-spike neuron keeps as many spikes a step as stay within it
    assert capped_at_clip(torch.tensor([1.5, 2.5]), c_max, clip)[1] == (2 if c_max is None else min(c_max, 2))


@pytest.mark.parametrize("slope", [0.01, 0.1, 0.5])
def test_a_leaky_relus_pair_of_neurons_converges_to_the_leaky_activation(slope):
    # the signed neuron of a leaky ReLU: one IF neuron integrates x, one -x; its output is the first's spikes minus
    # slope x the second's, whose rate converges to max(x, 0) + slope * min(x, 0)
    x = torch.linspace(-2.0, 2.0, 101)
    theta_positive, theta_negative = 2.0, 2.0
    errors = {}
    for T in (16, 64, 256):
        positive = run(IFNeuron(theta_positive), x.expand(T, -1)).sum(0) / T
        negative = run(IFNeuron(theta_negative), (-x).expand(T, -1)).sum(0) / T
        rate = positive - slope * negative
        errors[T] = (rate - torch.nn.functional.leaky_relu(x, slope)).abs().max().item()
        assert errors[T] <= (theta_positive + slope * theta_negative) / T + 1e-5
    assert errors[256] < errors[64] < errors[16]


def test_a_neuron_is_fixed_when_built_and_a_changed_spec_builds_another():
    neuron = IFNeuron(torch.tensor([1.0, 0.5]), v0=0.5)
    for name, value in (("threshold", torch.tensor(2.0)), ("v0", 0.0), ("bias", torch.tensor(0.1)), ("c_max", None)):
        with pytest.raises(AttributeError, match=f"a neuron's {name} is fixed when it is built"):
            setattr(neuron, name, value)
    assert neuron.threshold.tolist() == [1.0, 0.5] and neuron.bias is None and neuron.c_max == 1
    # a current of a quarter threshold every step: the bias alone makes the neuron fire, once in 4 steps from 0.5
    biased = IFNeuron.built(replace(neuron.spec, bias=torch.tensor([0.25, 0.125])))
    assert run(biased, torch.zeros(8, 2)).sum(0).tolist() == [2.0, 1.0]
    assert run(neuron, torch.zeros(8, 2)).sum().item() == 0.0  # the neuron built first has no bias still
    with pytest.raises(ValueError, match="thresholds must be positive"):
        replace(neuron.spec, threshold=torch.tensor([1.0, 0.0]))


def test_a_neuron_like_another_shares_its_spec_and_keeps_a_state_of_its_own():
    neuron = IFNeuron(torch.tensor(0.5), v0=torch.tensor([0.0, 0.5]), c_max=None, neg_threshold=1.0,
                      bias=torch.tensor([0.1, -0.1]))
    copy = IFNeuron.like(neuron, emits_coefficients=True)
    spec, copied = neuron.spec, copy.spec
    assert all(getattr(copied, name) is getattr(spec, name) for name in ("threshold", "v0", "bias"))
    assert (copied.c_max, copied.neg_threshold, copied.emits_coefficients) == (None, 1.0, True)
    currents = torch.tensor([[0.7, 1.3], [-0.4, 0.2], [1.6, -2.0]])
    emitted, coefficients = run(neuron, currents), run(copy, currents)
    torch.testing.assert_close(emitted, coefficients * 0.5, rtol=0, atol=0)
    assert neuron.v is not copy.v
