"""The spike-driven product of two tensors (attention's Q·Kᵀ and attention·V): its summed output is the product of
its operands' summed inputs, rescaled to a rate, whatever the chunking; its work counted by hand."""

import pytest
import torch

from snnbench.core.spike_product import SpikeProduct


def spike_train(steps, *shape, generator):
    """Signed multi-spike increments (coefficients -2..3 times a threshold), mostly silent, in float64."""
    coefficients = torch.randint(-2, 4, (steps, *shape), generator=generator).double()
    silent = torch.rand(steps, *shape, generator=generator) < 0.6
    return coefficients.masked_fill(silent, 0) * 0.37


def simulate(product, a, b, chunks):
    """Feed the per-step increments a [T, batch, ...], b [T, batch, ...] in chunks of the given sizes, folded into
    the batch dimension as the engines do; the outputs per step [T, batch, ...]."""
    T, batch = a.shape[:2]
    assert sum(chunks) == T
    product.begin(T)
    outputs, start = [], 0
    for steps in chunks:
        product.next_chunk(steps)
        out = product(a[start:start + steps].flatten(0, 1), b[start:start + steps].flatten(0, 1))
        outputs.append(out.view(steps, batch, *out.shape[1:]))
        start += steps
    return torch.cat(outputs)


@pytest.mark.parametrize("chunks", [[12], [1] * 12, [5, 4, 3]])
def test_summed_output_is_the_product_of_the_summed_inputs_over_t(chunks):
    generator = torch.Generator().manual_seed(0)
    a = spike_train(12, 3, 2, 5, 4, generator=generator)   # [T, batch, heads, tokens, head dim]
    b = spike_train(12, 3, 2, 4, 6, generator=generator)
    product = SpikeProduct()
    outputs = simulate(product, a, b, chunks)
    t = torch.arange(1, 13, dtype=torch.float64).view(-1, 1, 1, 1, 1)
    expected = (a.cumsum(0) @ b.cumsum(0)) / t
    torch.testing.assert_close(outputs.cumsum(0), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(product.product, a.sum(0) @ b.sum(0), rtol=1e-12, atol=1e-12)


def test_chunking_changes_neither_the_outputs_nor_the_counts():
    generator = torch.Generator().manual_seed(1)
    a = spike_train(10, 2, 3, 7, 5, generator=generator)
    b = spike_train(10, 2, 3, 5, 7, generator=generator)
    whole, stepwise, chunked = SpikeProduct(), SpikeProduct(), SpikeProduct()
    reference = simulate(whole, a, b, [10])
    torch.testing.assert_close(simulate(stepwise, a, b, [1] * 10), reference, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(simulate(chunked, a, b, [3, 3, 4]), reference, rtol=1e-12, atol=1e-12)
    assert torch.equal(stepwise.counts, whole.counts) and torch.equal(chunked.counts, whole.counts)
    assert whole.counts[0].sum() > 0


def test_constant_operands_give_the_product_of_their_values_every_step():
    """Rate coding: operands that receive x and y at every step encode x and y; their product emits x @ y per
    step. An operand constant over a chunk ([batch, ...]) counts as repeated at every step of it."""
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 3, generator=generator, dtype=torch.float64)
    y = torch.randn(2, 3, 5, generator=generator, dtype=torch.float64)
    product = SpikeProduct(spiking=(False, False))
    product.declare_constant_inputs([0])  # x: one current for every step of a chunk; y: given per step
    product.begin(6)
    for steps in (4, 2):
        product.next_chunk(steps)
        out = product(x, y.repeat(steps, 1, 1)).view(steps, 2, 4, 5)
        torch.testing.assert_close(out, (x @ y).expand(steps, 2, 4, 5), rtol=1e-12, atol=1e-12)


def test_work_counted_by_hand():
    """One image, A 2x2 (rows x inner), B 2x3 (inner x columns), two steps.
    Step 1: a_1 has one spike (meets a row of B: 3 accumulates), b_1 two (each meets a column of A: 2
    accumulates): 3 events, 3 + 2·2 = 7 synaptic operations; rescaling the 2x3 product: 6 MACs.
    Step 2: a_2 silent, b_2 one spike: 1 event, 2 synaptic operations, 6 MACs."""
    a = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]], [[[0.0, 0.0], [0.0, 0.0]]]])
    b = torch.tensor([[[[0.0, 1.0, 0.0], [2.0, 0.0, 0.0]]], [[[0.0, 0.0, -1.0], [0.0, 0.0, 0.0]]]])
    spiking = SpikeProduct()
    simulate(spiking, a, b, [2])
    assert spiking.events.tolist() == [3.0, 1.0]
    assert spiking.synaptic_ops.tolist() == [7.0, 2.0]
    assert spiking.macs.tolist() == [6.0, 6.0]
    # B analog: its term a dense product every step (2·2·3 MACs), A's spikes still synaptic operations
    half = SpikeProduct(spiking=(True, False))
    simulate(half, a, b, [2])
    assert half.events.tolist() == [1.0, 0.0]
    assert half.synaptic_ops.tolist() == [3.0, 0.0]
    assert half.macs.tolist() == [18.0, 18.0]



def test_same_outputs_as_the_analog_operator_of_the_product():
    """A matrix product computed as an analog operator on its operands' running means (expectation compensation,
    convert.nonlinear=compensate) emits what the spike-driven product does: only the count of the work differs."""
    from snnbench.core.analog import Analog, AnalogOperator, Slot

    generator = torch.Generator().manual_seed(4)
    a = spike_train(9, 2, 3, 5, 4, generator=generator)
    b = spike_train(9, 2, 3, 4, 5, generator=generator)
    analog = AnalogOperator(Analog(torch.matmul, (Slot(0), Slot(1)), {}, (True, True), True))
    torch.testing.assert_close(simulate(analog, a, b, [4, 5]), simulate(SpikeProduct(), a, b, [4, 5]),
                               rtol=1e-10, atol=1e-10)


def test_windows_folded_into_the_batch_dimension():
    """Swin's window attention multiplies [steps x batch x windows, heads, tokens, ...]: the share of one step is
    the leading dimension divided by the steps, whatever the engine's batch."""
    generator = torch.Generator().manual_seed(5)
    a = spike_train(6, 2 * 4, 3, 5, 4, generator=generator)   # 2 images x 4 windows
    b = spike_train(6, 2 * 4, 3, 4, 5, generator=generator)
    product = SpikeProduct()
    product.begin(6)
    outputs = []
    for start, steps in ((0, 4), (4, 2)):
        product.next_chunk(steps)
        outputs.append(product(a[start:start + steps].flatten(0, 1), b[start:start + steps].flatten(0, 1))
                       .unflatten(0, (steps, -1)))
    t = torch.arange(1, 7, dtype=torch.float64).view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(torch.cat(outputs).cumsum(0), (a.cumsum(0) @ b.cumsum(0)) / t, rtol=1e-12,
                               atol=1e-12)
