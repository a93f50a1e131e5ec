"""Convolutions and linear layers of spikes in exact integer arithmetic (CPU, oneDNN int8), behind
`sim.integer_conv`.

A conv or linear layer fed by spiking neurons, directly or through average pooling (and a flatten), receives
whole multiples of a quantum: the neuron's threshold (per layer or per channel), divided by the pooling area.
Its input is then exact as 8-bit integers, and its weights, scaled by the quanta, split into three int8 limbs
W ~ s q1 + s/254 q2 + s/254^2 q3 (s per output channel; 3 x 8 bits, as many as float32's mantissa). oneDNN sums
each limb in int32, exactly, and scales the three sums into one float32 output. On a CPU with AMX that is 2-4x
faster than the float32 convolution for VGG's layers, and nearer the exact result than float32 summation
(docs/performance.md). A linear layer, and a conv whose input has no more positions than the kernel has taps
(VGG's 2x2 maps), go through oneDNN's int8 matrix product.

A neuron whose every consumer computes in integers emits its coefficients c rather than c x threshold: those
consumers fold the threshold into their weights anyway, and the neuron saves a multiplication per step.
Layers fed by anything else (the image, additions, a split neuron's summed copies) keep their float forward.
`integer_modules` names the modules the int8 engine (snnbench.simulation.engines.int8) calls instead of the network's.
"""

import functools
import itertools
import math
from typing import NamedTuple

import torch
import torch.fx
from torch import nn

from snnbench.core.neurons import IFNeuron, SpikingGraph

LIMBS = 3
LIMB_RATIO = 254  # each limb's scale over the next: the residual of one limb (<= half a step) fits in int8


def cpu_has_amx() -> bool:
    """Whether the CPU has AMX tiles, where the integer layers were measured faster than float32 (with AVX-512
    VNNI alone, an AMD EPYC, they were not: docs/performance.md)."""
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
                got = IntegerLayer(conv, neuron, pooling_area=1)(spikes * 0.5)
                if not torch.allclose(got, conv(spikes * 0.5), rtol=1e-5, atol=1e-5):
                    return False
        return True
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


class IntegerLayer(nn.Module):
    """`layer` (a Conv2d or a Linear) for inputs that are whole multiples of what `neuron` emits per coefficient
    (its threshold, or 1 when it emits coefficients) divided by `pooling_area`; or, `summed`, the sums of its
    coefficients (poolings that sum after a neuron that emits them)."""

    def __init__(self, layer: nn.Conv2d | nn.Linear, neuron: IFNeuron, pooling_area: int, summed: bool = False):
        super().__init__()
        self.layer, self.neuron, self.pooling_area, self.summed = layer, neuron, pooling_area, summed
        # negative events (c < 0) ride on a zero point: uint8 = c + 128
        self.zero_point = 0 if neuron.neg_threshold is None else 128
        if isinstance(layer, nn.Conv2d):  # oneDNN's argument order
            self.geometry = list(layer.stride), list(layer.padding), list(layer.dilation), 1
        self.packed_shape = None

    def _pack(self, input_shape: tuple[int, ...]):
        """Fold the quanta into the weights and split them into int8 limbs, for inputs of this shape (without the
        batch); again whenever the input shape changes."""
        layer, threshold = self.layer, self.neuron.threshold
        if len(input_shape) not in (1, 3):
            raise ValueError(f"an integer layer takes rows of features or maps, got inputs of shape {input_shape}")
        quantum = _per_input(threshold, input_shape) / self.pooling_area  # what one level carries
        # levels per unit of input (None: the input is the levels)
        if not self.neuron.emits_coefficients:
            self.inverse_quantum = 1.0 / quantum
        else:  # the threshold is left to the weights, and poolings that sum leave nothing to divide
            self.inverse_quantum = None if self.summed else self.pooling_area
        weight = layer.weight.detach().double()
        if isinstance(layer, nn.Linear) and len(input_shape) == 3:
            # a map whose flatten was skipped: the columns (channel, row, column) taken in channels-last order
            weight = (weight.view(-1, *input_shape) * quantum.double()).permute(0, 2, 3, 1).reshape(len(weight), -1)
        else:
            weight = weight * quantum.double()
        bias = None if layer.bias is None else layer.bias.detach().float()
        # An input with no more positions than the kernel has taps: the conv is one dense matrix product with no
        # more multiply-accumulates, and oneDNN's int8 matrix product is far faster there than its convolution
        # (VGG's 2x2 layers: 1.8 against 24.7 ms, docs/performance.md).
        self.output_size = None
        if isinstance(layer, nn.Conv2d) and math.prod(input_shape[1:]) <= math.prod(layer.kernel_size):
            self.output_size = _output_size(layer, input_shape[1:])
            weight = _dense_matrix(layer, weight, input_shape[1:], self.output_size)
            bias = None if bias is None else bias.repeat(math.prod(self.output_size))
        self.matrix_product = isinstance(layer, nn.Linear) or self.output_size is not None
        limbs = _int8_limbs(weight)
        if self.matrix_product:
            self.limbs = [(torch.ops.onednn.qlinear_prepack(q, None), scale) for q, scale in limbs]
        else:
            self.limbs = [(torch.ops.onednn.qconv_prepack(q.contiguous(memory_format=torch.channels_last), scale,
                                                          1.0, self.zero_point, *self.geometry, None), scale)
                          for q, scale in limbs]
        self.bias, self.no_zero_points = bias, torch.zeros(len(weight), dtype=torch.long)
        self.packed_shape = input_shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.layer, nn.Linear) and x.dim() == 3:
            # tokens [batch, tokens, features] (transformers): each token one row, its channels the features
            return self(x.flatten(0, 1)).unflatten(0, x.shape[:2])
        shape = tuple(x.shape[1:])
        if self.packed_shape != shape:
            self._pack(shape)
        levels = x if self.inverse_quantum is None else torch.mul(x, self.inverse_quantum).round_()
        levels = (levels + self.zero_point if self.zero_point else levels).to(torch.uint8)
        if not self.matrix_product:
            return self._sum_limbs(functools.partial(torch.ops.onednn.qconv2d_pointwise, levels), self.geometry)
        # a conv's map goes in as rows of (position, channel) in channels-last order and comes out the same
        rows = levels.permute(0, 2, 3, 1).reshape(len(levels), -1) if levels.dim() == 4 else levels
        out = self._sum_limbs(functools.partial(torch.ops.onednn.qlinear_pointwise, rows), ())
        return out if self.output_size is None else out.view(len(levels), *self.output_size, -1).permute(0, 3, 1, 2)

    def _sum_limbs(self, product, geometry: tuple) -> torch.Tensor:
        """The float32 sum of each limb's int8 product (`product` of the levels, given the limb), smallest limb
        first: the float sums round least that way. (oneDNN's `sum` post-op instead of the additions copies the
        accumulator and is no faster.)"""
        out = None
        for weight, scale in reversed(self.limbs):
            limb = product(1.0, self.zero_point, weight, scale, self.no_zero_points,
                           self.bias if out is None else None, *geometry, 1.0, 0, torch.float32, "none", [], "")
            out = limb if out is None else out.add_(limb)
        return out


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


def _per_input(value: torch.Tensor, input_shape: tuple[int, ...]) -> torch.Tensor:
    """`value` (a scalar, or one per channel of the neuron) as it broadcasts over one input of this shape."""
    if not value.dim():
        return value
    if len(input_shape) == 1:  # a flattened map: each channel's value covers its positions' columns
        return value.repeat_interleave(input_shape[0] // len(value))
    return value.view(1, -1, 1, 1)


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


class SpikeSource(NamedTuple):
    """Where a layer's input comes from: a neuron's output through average poolings (and identities)."""
    neuron: IFNeuron
    pooling_area: int                  # the product of the poolings' areas
    poolings: tuple[nn.AvgPool2d, ...]


def spike_fed_layers(graph: SpikingGraph) -> dict[str, SpikeSource]:
    """The convs and linear layers whose input is the output of an IF neuron, directly or through average pooling
    (and identities, a flatten before a linear layer), by name. Only those whose integer levels fit in 8 bits, from
    neurons with one threshold per layer or per channel (the quantum folded into the weights: per-neuron
    thresholds, method=snm, would need one per input position)."""
    found = {}
    for node in graph.nodes:
        layer = graph.module(node)
        if _integer_capable(layer) and (source := _spike_source(node, graph, layer)):
            if _levels_fit(source.neuron, source.pooling_area) and source.neuron.threshold.dim() <= 1:
                found[node.target] = source
    return found


def _spike_source(node: torch.fx.Node, graph: SpikingGraph, layer: nn.Module | None) -> SpikeSource | None:
    """The neuron whose output reaches `node` through modules that pass spikes on to `layer` (None: any layer)."""
    source, poolings = node.args[0], []
    while (module := graph.module(source)) is not None:
        if isinstance(module, IFNeuron):
            return SpikeSource(module, math.prod(_pooling_area(pool) for pool in poolings), tuple(poolings))
        if not _passes_spikes(module, layer):
            return None
        if isinstance(module, nn.AvgPool2d):
            poolings.append(module)
        source = source.args[0]
    return None


def summing_poolings(graph: SpikingGraph, emitters: set[IFNeuron]) -> set[nn.AvgPool2d]:
    """The average poolings fed by neurons that emit their coefficients, at every call: those may sum rather than
    average, so that the integer layers after them receive whole levels."""
    verdicts = {}
    for node in graph.nodes:
        if isinstance(pool := graph.module(node), nn.AvgPool2d):
            source = _spike_source(node, graph, None) if _passes_spikes(pool, None) else None
            verdicts[pool] = verdicts.get(pool, True) and source is not None and source.neuron in emitters
    return {pool for pool, verdict in verdicts.items() if verdict}


def _summing(pool: nn.AvgPool2d) -> nn.AvgPool2d:
    """`pool` with the sum of each window instead of its average."""
    return nn.AvgPool2d(pool.kernel_size, pool.stride, pool.padding, pool.ceil_mode, pool.count_include_pad,
                        divisor_override=1)


def coefficient_emitters(graph: SpikingGraph, integer_layers: set[str]) -> set[IFNeuron]:
    """The neurons whose output reaches nothing but the named integer layers (through modules that pass spikes
    on): those may emit their coefficients, since the layers fold the threshold into their weights."""
    return _feeding_only(graph, IFNeuron, integer_layers)


def skippable_flattens(graph: SpikingGraph, integer_layers: dict[str, nn.Module]) -> set[nn.Flatten]:
    """The flattens whose output reaches nothing but integer linear layers: those read the map itself, in
    channels-last order, which saves the flatten's copy of a channels-last map."""
    linear = {name for name, layer in integer_layers.items() if isinstance(layer, nn.Linear)}
    return {flatten for flatten in _feeding_only(graph, nn.Flatten, linear) if _passes_spikes(flatten, None)}


class MapOrRows(nn.Module):
    """A skipped flatten: a map stays as it is for the integer linear layer, anything else flattens."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if x.dim() == 4 else x.flatten(1)


def _feeding_only(graph: SpikingGraph, kind: type, layers: set[str]) -> set[nn.Module]:
    """The modules of type `kind` whose every call's output reaches nothing but the named layers."""
    verdicts = {}
    for node in graph.nodes:
        if isinstance(module := graph.module(node), kind):
            verdicts[module] = verdicts.get(module, True) and _reaches_only(node, layers, graph)
    return {module for module, verdict in verdicts.items() if verdict}


def _reaches_only(node: torch.fx.Node, layers: set[str], graph: SpikingGraph) -> bool:
    """Whether every path from `node` through modules that pass spikes on ends in one of `layers`."""
    for user in node.users:
        if user.op == "call_module" and user.target in layers:
            continue
        module = graph.module(user)
        if module is None or not _passes_spikes(module, None) or not _reaches_only(user, layers, graph):
            return False
    return bool(node.users)


def _integer_capable(layer: nn.Module | None) -> bool:
    if isinstance(layer, nn.Conv2d):
        return layer.groups == 1 and layer.padding_mode == "zeros" and not isinstance(layer.padding, str)
    return isinstance(layer, nn.Linear)


def _passes_spikes(module: nn.Module, layer: nn.Module | None) -> bool:
    """Whether `module`, between a neuron and `layer` (None: any layer), keeps its output whole multiples of a
    quantum per channel: average pooling of fixed area, identities, and a flatten into a linear layer."""
    if isinstance(module, nn.Flatten):
        return module.start_dim == 1 and module.end_dim == -1 and not isinstance(layer, nn.Conv2d)
    if isinstance(module, nn.AvgPool2d):
        return _pooling_area(module) is not None
    return isinstance(module, nn.Identity | nn.Dropout)


def _depth(layer: nn.Conv2d | nn.Linear) -> int:
    """Multiply-accumulates per output value."""
    return layer.weight[0].numel()


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


def integer_modules(graph: SpikingGraph, min_depth: int = 0) -> dict[str, nn.Module]:
    """The modules that compute `graph`'s network in integers where it can, by the name of the network's module
    each one stands for: the spike-fed convs and linear layers at least `min_depth` deep (multiply-accumulates per
    output value) as IntegerLayers; the neurons that feed nothing else as neurons that emit their coefficients;
    the poolings after those summing; the flattens before integer linear layers alone passing maps on. The
    network's own modules are not changed."""
    sources = spike_fed_layers(graph)
    layers = {name: graph.modules[name] for name in sources if _depth(graph.modules[name]) >= min_depth}
    emitters = coefficient_emitters(graph, set(layers)) if layers else set()
    poolings = summing_poolings(graph, emitters) if emitters else set()
    flattens = skippable_flattens(graph, layers) if layers else set()
    names = {graph.module(node): node.target for node in graph.nodes if graph.module(node) is not None}
    emitting = {neuron: IFNeuron.like(neuron, emits_coefficients=True) for neuron in emitters}
    replacements = {}
    for name, layer in layers.items():
        source = sources[name]
        replacements[name] = IntegerLayer(layer, emitting.get(source.neuron, source.neuron), source.pooling_area,
                                          summed=source.neuron in emitters and poolings.issuperset(source.poolings))
    replacements.update({names[pool]: _summing(pool) for pool in poolings})
    replacements.update({names[flatten]: MapOrRows() for flatten in flattens})
    replacements.update({names[neuron]: emitting[neuron] for neuron in emitters})
    return replacements
