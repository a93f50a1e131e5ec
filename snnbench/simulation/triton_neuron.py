"""The IF neuron family of snnbench.core.neurons as one Triton kernel per chunk of steps (the `triton` engine).

One launch simulates a whole chunk of steps of one neuron layer: each program keeps BLOCK neurons' membranes (and
net counts) in registers across the steps, reads each step's input current once (a constant current once per
chunk), writes what the neurons emit, and sums its spike units and events per step; the per-block sums stay on the
device. The arithmetic is IFNeuron's, operation for operation in float32, so the two agree bit for bit:

    v += I (+ bias);  c = [v >= theta]  or  clamp(floor(v / theta), 0, c_max);  the negative event likewise;
    out = c * theta;  v -= out          (a neuron that emits c: v -= c * theta rounded once, as addcmul_ does)

Floor division is exact (the floor of the exact quotient, as ATen's `torch.div(..., rounding_mode="floor")`
gives it): the floor of the correctly rounded quotient, one lower where its product with theta overshoots v,
checked in float64 (where that product is exact). Fused multiply-adds are off, as in PyTorch's separate kernels.
With TRITON_INTERPRET=1 (set before Triton is imported) the same kernel runs on CPU tensors, which is how the
tests check it on a machine without a GPU.
"""

import math

import torch
import triton
import triton.language as tl

from snnbench.core.neurons import IFNeuron
from snnbench.core.stepped import channel_dim

BLOCK = 1024  # neurons per program: 8 per thread of 4 warps


@triton.jit
def _floor_quotient(a, b):
    """floor(a / b) of the exact quotient, for b > 0."""
    q = tl.math.floor(tl.math.div_rn(a, b))
    return q - (q.to(tl.float64) * b.to(tl.float64) > a.to(tl.float64)).to(tl.float32)


@triton.jit
def _chunk_kernel(x_ptr, out_ptr, v_ptr, net_ptr, theta_ptr, theta_stride, theta_period, bias_ptr, bias_stride,
                  bias_period, counts_ptr, n, steps, neg_factor, c_max, CONSTANT: tl.constexpr, BIAS: tl.constexpr,
                  NEGATIVE: tl.constexpr, POSITIVE_NET: tl.constexpr, BINARY: tl.constexpr, BOUNDED: tl.constexpr,
                  EMITS: tl.constexpr, BLOCK: tl.constexpr):
    """`steps` steps of `n` neurons (one step's elements, in memory order). The neuron at offset i has the
    threshold theta_ptr[(i // theta_stride) % theta_period] (a scalar, one per channel or one per neuron), and
    the bias likewise; counts_ptr: int32 [2, steps, blocks], this block's spike units and events of each step."""
    block = tl.program_id(0)
    blocks = tl.num_programs(0)
    offsets = block * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < n
    theta = tl.load(theta_ptr + (offsets // theta_stride) % theta_period, mask=inside, other=1.0)
    if BIAS:
        bias = tl.load(bias_ptr + (offsets // bias_stride) % bias_period, mask=inside, other=0.0)
    v = tl.load(v_ptr + offsets, mask=inside, other=0.0)
    if NEGATIVE:
        net = tl.load(net_ptr + offsets, mask=inside, other=0.0)
        level = neg_factor * theta
    x_at = x_ptr + offsets
    out_at = out_ptr + offsets
    if CONSTANT:
        current = tl.load(x_at, mask=inside, other=0.0)
        if BIAS:
            current = current + bias
    for step in range(steps):
        if not CONSTANT:
            current = tl.load(x_at, mask=inside, other=0.0)
            if BIAS:
                current = current + bias
            x_at += n
        v = v + current
        if BINARY:
            c = (v >= theta).to(tl.float32)
        else:
            c = tl.maximum(_floor_quotient(v, theta), 0.0)
            if BOUNDED:
                c = tl.minimum(c, c_max)
        if NEGATIVE:
            # undo earlier over-firing: at least one spike, at most the net count so far
            if BINARY:
                undo = (v <= level).to(tl.float32)
            else:
                undo = tl.maximum(_floor_quotient(-v, theta), 1.0)
                if BOUNDED:
                    undo = tl.minimum(undo, c_max)
                undo = undo * (v <= level).to(tl.float32)
            if POSITIVE_NET:
                undo = tl.minimum(undo, net)
            c = c - undo
            net = net + c
        if EMITS:
            tl.store(out_at, c, mask=inside)
            v = (v.to(tl.float64) - c.to(tl.float64) * theta.to(tl.float64)).to(tl.float32)
        else:
            emitted = c * theta
            tl.store(out_at, emitted, mask=inside)
            v = v - emitted
        out_at += n
        tl.store(counts_ptr + step * blocks + block, tl.sum(tl.abs(c).to(tl.int32), 0))
        tl.store(counts_ptr + (steps + step) * blocks + block, tl.sum((c != 0).to(tl.int32), 0))
    tl.store(v_ptr + offsets, v, mask=inside)
    if NEGATIVE:
        tl.store(net_ptr + offsets, net, mask=inside)


class TritonNeuron(IFNeuron):
    """An IFNeuron whose chunk of steps is one launch of the fused kernel."""

    def _run_steps(self, x: torch.Tensor, constant: bool, theta: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        layout = _dense_layout(self.v)
        x = x.contiguous(memory_format=layout)
        n = self.v.numel()
        blocks = triton.cdiv(n, BLOCK)
        counts = torch.empty((2, self.steps, blocks), dtype=torch.int32, device=x.device)
        bias = self.threshold if self.bias is None else self.bias  # (not read without a bias)
        _chunk_kernel[(blocks,)](
            x, out, self.v, self.v if self.net is None else self.net, *_in_memory_order(self.threshold, self.v),
            *_in_memory_order(bias, self.v), counts, n, self.steps, -float(self.neg_threshold or 0.0),
            float(self.c_max or 0), CONSTANT=constant, BIAS=self.bias is not None,
            NEGATIVE=self.neg_threshold is not None, POSITIVE_NET=self.require_positive_net,
            BINARY=self.c_max == 1, BOUNDED=self.c_max is not None, EMITS=self.emits_coefficients, BLOCK=BLOCK,
            enable_fp_fusion=False)
        return counts.sum(2)


def _dense_layout(v: torch.Tensor) -> torch.memory_format:
    return torch.contiguous_format if v.is_contiguous() else torch.channels_last


def _in_memory_order(value: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """A neuron parameter (a scalar, one value per channel, or one per neuron shaped like one sample) as (values,
    stride, period): the neuron at offset i of the membrane `v` [batch, ...] has values[(i // stride) % period]."""
    if value.dim() == 0:
        return value, 1, 1
    if value.dim() == 1:  # per channel: planes apart in a contiguous map, else consecutive (features, tokens' last)
        return value, math.prod(v.shape[channel_dim(v.dim()) + 1:]) if v.is_contiguous() else 1, len(value)
    per_neuron = value.expand(v.shape[1:]).unsqueeze(0).contiguous(memory_format=_dense_layout(v))
    return per_neuron, 1, v[0].numel()
