"""Convolutions of spikes in exact integer arithmetic (CPU, oneDNN int8), behind `sim.integer_conv`.

A conv fed by spiking neurons, directly or through average pooling, receives whole multiples of a quantum: the
neuron's threshold (per layer or per channel), divided by the pooling area. Its input is then exact as 8-bit
integers, and its weights, scaled by the quanta, split into three int8 limbs W ~ s q1 + s/254 q2 + s/254^2 q3
(s per output channel; 3 x 8 bits, as many as float32's mantissa). oneDNN sums each limb in int32, exactly, and
scales the three sums into one float32 output. On a CPU with AMX that is 2-4x faster than the float32
convolution for VGG's layers, and nearer the exact result than float32 summation (docs/performance.md). An input
with no more positions than the kernel has taps (VGG's 2x2 maps) goes through one dense int8 matrix product.

Convs fed by anything else (the image, additions, a split neuron's summed copies) keep their float forward.
"""

import contextlib
import functools
import itertools

import torch
import torch.fx
from torch import nn

from snnbench.neurons import IFNeuron

LIMBS = 3
LIMB_RATIO = 254  # each limb's scale over the next: the residual of one limb (<= half a step) fits in int8


def cpu_has_amx() -> bool:
    """Whether the CPU has AMX tiles, where the integer convolution was measured faster than float32."""
    return bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


@functools.cache
def int8_conv_available() -> bool:
    """Whether this PyTorch has oneDNN's int8 convolution and matrix product with float32 output (checked once,
    on a tiny conv in both forms)."""
    try:
        generator = torch.Generator().manual_seed(0)
        conv, neuron = nn.Conv2d(4, 4, 3, padding=1), IFNeuron(torch.tensor(0.5))
        with torch.inference_mode():
            for size in (5, 2):
                spikes = (torch.rand(2, 4, size, size, generator=generator) < 0.5).float()
                got = IntegerConvolution(conv, neuron, pooling_area=1)(spikes * 0.5)
                if not torch.allclose(got, conv(spikes * 0.5), rtol=1e-5, atol=1e-5):
                    return False
        return True
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


class IntegerConvolution:
    """The forward of `conv` for inputs that are whole multiples of `neuron`'s threshold / `pooling_area`."""

    def __init__(self, conv: nn.Conv2d, neuron: IFNeuron, pooling_area: int):
        self.conv, self.neuron, self.pooling_area = conv, neuron, pooling_area
        # negative events (c < 0) ride on a zero point: uint8 = c + 128
        self.zero_point = 0 if neuron.neg_threshold is None else 128
        self.geometry = list(conv.stride), list(conv.padding), list(conv.dilation), 1  # oneDNN's argument order
        self.packed_threshold = self.packed_size = None

    def _pack(self, input_size: tuple[int, int]):
        """Fold the quanta into the weights and split them into int8 limbs, for this input size; again whenever
        the threshold tensor is replaced (TTRBR's tuning assigns new ones) or the input size changes."""
        conv, threshold = self.conv, self.neuron.threshold
        quantum = (threshold.view(1, -1, 1, 1) if threshold.dim() else threshold) / self.pooling_area
        self.inverse_quantum = 1.0 / quantum
        weight = conv.weight.detach().double() * quantum.double()
        # An input with no more positions than the kernel has taps: the conv is one dense matrix product with no
        # more multiply-accumulates, and oneDNN's int8 matrix product is far faster there than its convolution
        # (VGG's 2x2 layers: 1.8 against 24.7 ms, docs/performance.md).
        self.dense = input_size[0] * input_size[1] <= conv.kernel_size[0] * conv.kernel_size[1]
        bias = None if conv.bias is None else conv.bias.detach().float()
        if self.dense:
            self.output_size = _output_size(conv, input_size)
            weight = _dense_matrix(conv, weight, input_size, self.output_size)
            bias = None if bias is None else bias.repeat(self.output_size[0] * self.output_size[1])
            self.limbs = [(torch.ops.onednn.qlinear_prepack(q, None), scale) for q, scale in _int8_limbs(weight)]
        else:
            self.limbs = [(torch.ops.onednn.qconv_prepack(q.contiguous(memory_format=torch.channels_last), scale,
                                                          1.0, self.zero_point, *self.geometry, None), scale)
                          for q, scale in _int8_limbs(weight)]
        self.bias, self.no_zero_points = bias, torch.zeros(len(weight), dtype=torch.long)
        self.packed_threshold, self.packed_size = threshold, input_size

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        size = tuple(x.shape[2:])
        if self.packed_threshold is not self.neuron.threshold or self.packed_size != size:
            self._pack(size)
        levels = torch.mul(x, self.inverse_quantum).round_()
        if self.zero_point:
            levels += self.zero_point
        levels = levels.to(torch.uint8)
        return self._dense(levels) if self.dense else self._convolve(levels)

    def _convolve(self, levels: torch.Tensor) -> torch.Tensor:
        out = None
        for weight, scale in reversed(self.limbs):  # smallest limb first: the float sums round least that way
            if out is None:
                out = torch.ops.onednn.qconv2d_pointwise(
                    levels, 1.0, self.zero_point, weight, scale, self.no_zero_points, self.bias, *self.geometry,
                    1.0, 0, torch.float32, "none", [], "")
            else:
                out = torch.ops.onednn.qconv2d_pointwise.binary(
                    levels, 1.0, self.zero_point, weight, scale, self.no_zero_points, out, None, *self.geometry,
                    1.0, 0, torch.float32, 1.0, 0, "sum", 1.0, "none", [], "")
        return out

    def _dense(self, levels: torch.Tensor) -> torch.Tensor:
        """Rows of (position, channel) in channels-last order in, the same out, seen as a channels-last map."""
        flat, out = levels.permute(0, 2, 3, 1).reshape(len(levels), -1), None
        for weight, scale in reversed(self.limbs):
            product = torch.ops.onednn.qlinear_pointwise(
                flat, 1.0, self.zero_point, weight, scale, self.no_zero_points, self.bias if out is None else None,
                1.0, 0, torch.float32, "none", [], "")
            out = product if out is None else out.add_(product)
        return out.view(len(levels), *self.output_size, -1).permute(0, 3, 1, 2)


def _int8_limbs(weight: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`weight` (float64, one output per row) as LIMBS int8 tensors with float32 scales per row, each limb's scale
    1/LIMB_RATIO of the one before: weight = sum of q * scale to about float32's precision."""
    rows = (-1,) + (1,) * (weight.dim() - 1)
    scale = (weight.abs().amax(dim=tuple(range(1, weight.dim()))) / 127).clamp(min=torch.finfo(torch.float32).tiny)
    limbs = []
    for _ in range(LIMBS):
        scale = scale.float()  # oneDNN applies the scales in float32: split with those values
        step = scale.double().view(rows)
        q = torch.round(weight / step)
        weight = weight - q * step
        limbs.append((q.to(torch.int8), scale))
        scale = scale / LIMB_RATIO
    return limbs


def _output_size(conv: nn.Conv2d, input_size: tuple[int, int]) -> tuple[int, int]:
    return tuple((size + 2 * p - d * (k - 1) - 1) // s + 1 for size, k, s, p, d in
                 zip(input_size, conv.kernel_size, conv.stride, conv.padding, conv.dilation, strict=True))


def _dense_matrix(conv: nn.Conv2d, weight: torch.Tensor, input_size: tuple[int, int],
                  output_size: tuple[int, int]) -> torch.Tensor:
    """`conv` (with `weight`) from inputs of `input_size` to outputs of `output_size` as one matrix: rows (i, j,
    output channel), columns (h, w, input channel), the channels-last order of its output and input."""
    (height, width), (rows, cols) = input_size, output_size
    matrix = weight.new_zeros(rows, cols, conv.out_channels, height, width, conv.in_channels)
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = conv.kernel_size, conv.stride, conv.padding, conv.dilation
    for i, j, a, b in itertools.product(range(rows), range(cols), range(kh), range(kw)):
        h, w = i * sh - ph + a * dh, j * sw - pw + b * dw
        if 0 <= h < height and 0 <= w < width:
            matrix[i, j, :, h, w, :] = weight[:, :, a, b]
    return matrix.reshape(rows * cols * conv.out_channels, height * width * conv.in_channels)


def spike_fed_convs(model: nn.Module) -> dict[str, tuple[IFNeuron, int]]:
    """The convs of `model` whose input is the output of an IF neuron, directly or through average pooling (and
    identities): name -> (the neuron, the pooling area). Only those whose integer levels fit in 8 bits."""
    modules = dict(model.named_modules())
    graph = _NeuronTracer().trace(model)
    found = {}
    for node in graph.nodes:
        conv = modules.get(node.target) if node.op == "call_module" else None
        if not (isinstance(conv, nn.Conv2d) and conv.groups == 1 and conv.padding_mode == "zeros"
                and not isinstance(conv.padding, str)):
            continue
        source, area = node.args[0], 1
        while isinstance(source, torch.fx.Node) and source.op == "call_module":
            module = modules[source.target]
            if isinstance(module, IFNeuron):
                if _levels_fit(module, area):
                    found[node.target] = (module, area)
                break
            if isinstance(module, nn.AvgPool2d) and (pooled := _pooling_area(module)):
                area *= pooled
            elif not isinstance(module, nn.Identity | nn.Dropout):
                break
            source = source.args[0]
    return found


def _depth(conv: nn.Conv2d) -> int:
    """Multiply-accumulates per output value."""
    return conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]


def _levels_fit(neuron: IFNeuron, area: int) -> bool:
    """The largest |c| x pooling area fits in uint8 (negative events: in int8 around the zero point)."""
    if neuron.c_max is None:
        return False
    return neuron.c_max * area <= (255 if neuron.neg_threshold is None else 127)


def _pooling_area(pool: nn.AvgPool2d) -> int | None:
    """The divisor of an average pooling that divides every window by the same area (None otherwise)."""
    if pool.divisor_override:
        return pool.divisor_override
    size = pool.kernel_size if isinstance(pool.kernel_size, tuple) else (pool.kernel_size, pool.kernel_size)
    padding = pool.padding if isinstance(pool.padding, tuple) else (pool.padding, pool.padding)
    if pool.ceil_mode or (any(padding) and not pool.count_include_pad):
        return None
    return size[0] * size[1]


class _NeuronTracer(torch.fx.Tracer):
    """Traces a spiking network with its neurons as opaque calls."""

    def is_leaf_module(self, module: nn.Module, name: str) -> bool:
        return isinstance(module, IFNeuron) or super().is_leaf_module(module, name)


@contextlib.contextmanager
def integer_convolutions(model: nn.Module, min_depth: int | None = 0):
    """Within the block the spike-fed convs of `model` at least `min_depth` deep (input channels x kernel taps; None:
    none) compute in integers; their float forward comes back after."""
    sources = {} if min_depth is None else spike_fed_convs(model)
    convs = {name: model.get_submodule(name) for name in sources}
    convs = {name: conv for name, conv in convs.items() if _depth(conv) >= min_depth}
    for name, conv in convs.items():
        conv.forward = IntegerConvolution(conv, *sources[name])
    try:
        yield
    finally:
        for conv in convs.values():
            del conv.forward

