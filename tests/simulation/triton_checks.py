"""The fused Triton kernel (snnbench.triton_neuron, the `triton` engine) against IFNeuron and the reference engine,
bit for bit: on a GPU, or on the CPU under Triton's interpreter (TRITON_INTERPRET=1 from the start of the process,
before Triton is imported: tests/simulation/test_triton_neuron.py runs this file so in the default suite).

    TRITON_INTERPRET=1 pytest -q tests/simulation/triton_checks.py     # CPU, the interpreter
    pytest -q -m '' tests/simulation/triton_checks.py                  # a CUDA device, the compiled kernel, every case
"""

import itertools
import os

import pytest
import torch
from torch import nn

from snnbench.core.neurons import IFNeuron
from snnbench.simulation import engines
from snnbench.simulation.backend import Settings
from snnbench.simulation.engines.reference import Reference
from snnbench.simulation.engines.torch import Torch
from snnbench.simulation.engines.triton import Triton

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
if not (INTERPRETED or torch.cuda.is_available()):
    pytest.skip("needs a CUDA device or TRITON_INTERPRET=1", allow_module_level=True)
triton_neuron = pytest.importorskip("snnbench.simulation.triton_neuron")
DEVICE = "cpu" if INTERPRETED else "cuda"


KINDS = {
    "binary": {},
    "binary, v0 and bias per channel": {"v0": "per channel", "bias": "per channel"},
    "ternary": {"neg_threshold": 1.0},
    "ternary, negative net allowed": {"neg_threshold": 0.5, "require_positive_net": False},
    "augmented": {"c_max": None, "neg_threshold": 1.0, "v0": 0.5},
    "augmented, c_max 3, per-channel thresholds": {"c_max": 3, "neg_threshold": 1.0, "threshold": "per channel"},
    "augmented without negative events, emits c": {"c_max": None, "emits_coefficients": True,
                                                   "bias": "per channel"},
    "ternary c_max 4, emits c, per-channel thresholds": {"c_max": 4, "neg_threshold": 2.0, "emits_coefficients": True,
                                                         "threshold": "per channel"},
    "augmented c_max 2, threshold, v0 and bias per neuron": {"c_max": 2, "neg_threshold": 1.0, "v0": "per neuron",
                                                             "threshold": "per neuron", "bias": "per neuron"},
}


def neuron_of(kind: str, sample: tuple[int, ...]) -> IFNeuron:
    """A neuron of `kind` for inputs of `sample`'s shape (without the batch)."""
    knobs = dict(KINDS[kind])
    generator = torch.Generator().manual_seed(len(kind))

    def values(scope, low, spread):
        shape = {"per channel": sample[:1], "per neuron": sample}[scope]
        return torch.rand(shape, generator=generator) * spread + low
    scope = knobs.pop("threshold", None)
    threshold = values(scope, 0.3, 1.0) if scope else torch.tensor(0.37)
    if knobs.get("v0") in ("per channel", "per neuron"):
        knobs["v0"] = values(knobs["v0"], 0.0, 1.0)
    if knobs.get("bias"):
        knobs["bias"] = values(knobs["bias"], -0.1, 0.2)
    return IFNeuron(threshold, **knobs).to(DEVICE)


SHAPES = {"maps": (3, 4, 5, 5), "maps, channels-last": (3, 4, 5, 5), "rows": (3, 24)}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", KINDS)
def test_the_kernel_computes_what_the_neuron_does_bit_for_bit(kind, shape):
    batch, *sample = SHAPES[shape]
    layout = torch.channels_last if "channels-last" in shape else torch.contiguous_format
    reference = neuron_of(kind, tuple(sample))
    fused = triton_neuron.TritonNeuron.like(reference)
    generator = torch.Generator().manual_seed(3)
    # not dyadic, and large enough for several spikes per step: every rounding of the rule is exercised
    currents = (torch.randn(7, batch, *sample, generator=generator) * 0.6 + 0.2).to(DEVICE)
    for neuron in (reference, fused):
        neuron.begin(7)
    for first, steps in ((0, 3), (3, 1), (4, 3)):
        chunk = currents[first:first + steps].flatten(0, 1)
        chunk = chunk.contiguous(memory_format=layout) if chunk.dim() == 4 else chunk
        outputs = []
        for neuron in (reference, fused):
            neuron.next_chunk(steps)
            outputs.append(neuron(chunk))
        assert torch.equal(outputs[1], outputs[0])
        assert torch.equal(fused.v, reference.v)
        assert fused.net is None if reference.net is None else torch.equal(fused.net, reference.net)
    assert outputs[0].is_contiguous(memory_format=layout) and outputs[1].is_contiguous(memory_format=layout)
    assert torch.equal(fused.counts, reference.counts)
    assert (reference.units > 0).all() and (reference.events > 0).all()
    if reference.neg_threshold is not None:
        assert (outputs[0] < 0).any()


@pytest.mark.parametrize("kind", ["binary", "augmented, c_max 3, per-channel thresholds"])
def test_a_constant_current_is_read_once_per_chunk_and_integrated_every_step(kind):
    reference = neuron_of(kind, (4, 5, 5))
    fused = triton_neuron.TritonNeuron.like(reference)
    current = torch.rand(3, 4, 5, 5, generator=torch.Generator().manual_seed(4)).to(DEVICE)  # every step
    outputs = []
    for neuron in (reference, fused):
        neuron.declare_constant_inputs([0])
        neuron.begin(6)
        neuron.next_chunk(6)
        outputs.append(neuron(current))
    assert outputs[0].shape == (18, 4, 5, 5) and torch.equal(outputs[1], outputs[0])
    assert torch.equal(fused.v, reference.v) and torch.equal(fused.counts, reference.counts)


def test_floor_quotients_next_to_whole_numbers_are_exact():
    """Membranes at k x theta and one float below: the rounded quotient would often be k for both."""
    theta = torch.tensor(0.3, device=DEVICE)
    at = torch.arange(1.0, 65.0, device=DEVICE) * theta
    v = torch.stack([torch.nextafter(at, torch.zeros((), device=DEVICE)), at])
    exact = torch.floor(v.double() / theta.double())  # float64: no rounding to a whole number this close
    outputs = []
    for neuron in (IFNeuron(theta, c_max=None), triton_neuron.TritonNeuron(theta, c_max=None, emits_coefficients=True)):
        neuron.begin(1)
        outputs.append(neuron(v))
    assert torch.equal(outputs[1], exact.float())
    assert torch.equal(outputs[0], exact.float() * theta)


def network(kind: str) -> nn.Sequential:
    torch.manual_seed(2)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), neuron_of(kind, (4, 6, 6)), nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(36, 16), neuron_of(kind, (16,)), nn.Linear(16, 4)).to(DEVICE)


def images(n=2, batch=5):
    torch.manual_seed(1)
    return [(torch.rand(batch, 1, 6, 6) * 2, torch.randint(0, 4, (batch,))) for _ in range(n)]


ENGINE_KINDS = ["binary, v0 and bias per channel", "ternary", "augmented", "augmented, c_max 3, per-channel thresholds",
                "augmented c_max 2, threshold, v0 and bias per neuron"]
LAYOUTS = {"standard": torch.contiguous_format, "channels-last": torch.channels_last}
# each neuron kind once, each layout and coding twice (the interpreter is slow); all combinations with -m ''
ENGINE_CASES = [(ENGINE_KINDS[0], "standard", "poisson"), (ENGINE_KINDS[1], "channels-last", "direct"),
                (ENGINE_KINDS[2], "standard", "direct"), (ENGINE_KINDS[3], "channels-last", "poisson"),
                (ENGINE_KINDS[4], "channels-last", "direct")]


@pytest.mark.parametrize(("kind", "layout", "coding"), [
    pytest.param(*case, marks=() if case in ENGINE_CASES else pytest.mark.slow)
    for case in itertools.product(ENGINE_KINDS, LAYOUTS, ("direct", "poisson"))])
def test_the_triton_engine_gives_the_references_results(kind, layout, coding):
    data, T = images(), 9
    # one block at a time: the last block's membranes are then those of one graph
    settings = Settings(T, chunk=4, coding=coding, device=DEVICE, seed=3, layout=LAYOUTS[layout], sub_batch=3,
                        threads=1)
    fused = Triton().prepare(network(kind), settings)
    folded = Torch().prepare(network(kind), settings)  # the same layers, the same folding
    reference = Reference().prepare(network(kind), settings)
    assert all(isinstance(neuron, triton_neuron.TritonNeuron) for neuron in fused.neurons[0].values())
    expected, got, _ = reference.run(data), fused.run(data), folded.run(data)
    assert torch.equal(got.correct, expected.correct) and got.num_images == expected.num_images == 10
    for name in expected.events:
        assert expected.events[name].sum() > 0
        assert torch.equal(got.events[name], expected.events[name])
        assert torch.equal(got.units[name], expected.units[name])
        # the last block's membranes (the reference's may differ in the last bit: its layers see one step at a
        # time, and a matrix product of another size may sum in another order)
        assert torch.equal(fused.neurons[0][name].v, folded.neurons[0][name].v)


def test_the_triton_engine_runs_here():
    assert engines.resolve("triton", DEVICE) == Triton()
    assert engines.resolve("auto", DEVICE) == (Triton() if torch.device(DEVICE).type == "cuda" else Torch())
