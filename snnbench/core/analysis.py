"""What a canonical network costs: synapses per neuron (fan-out) and multiply-accumulates per image."""

import math

import torch
from torch import nn

from snnbench.core.analog import MATRIX_PRODUCTS, Analog, spike_products
from snnbench.core.graph import device_of, reached, trace

CONVS = nn.Conv1d | nn.Conv2d | nn.Conv3d


def fan_out(model: nn.Module) -> dict[str, float]:
    """Synapses per neuron of each ReLU layer of a canonical network: for every conv it reaches through linear
    ops (pooling, padding, additions, flattening, affine maps) C_out / groups * k^2 / stride^2 (a depthwise conv:
    k^2 / stride^2), for a linear layer its outputs, and 1 for an identity path into another neuron (a residual
    shortcut); none into a product of spike trains (spike_products), which counts its own synaptic operations."""
    traced = trace(model)
    modules, products = dict(model.named_modules()), spike_products(traced)
    result = {}
    for node in traced.graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], nn.ReLU):
            continue

        def synapses(user) -> float:
            target = modules.get(user.target) if user.op == "call_module" else None
            if isinstance(target, nn.modules.conv._ConvNd):
                return _conv_fan_out(target)
            if isinstance(target, nn.Linear):
                return target.out_features
            if user.target in products:  # a product of spike trains counts its synaptic operations itself
                return 0.0
            # another neuron, or an analog operator, adds each input to its membrane or running sum
            return 1.0 if isinstance(target, nn.ReLU | Analog) else 0.0

        def passes(user) -> bool:  # a linear map between the neuron and what it drives
            return user.op != "output" and synapses(user) == 0.0 and user.target not in products

        result[node.target] = sum(synapses(user) for user in reached(node.users, lambda user: user.users, passes))
    return result


def _conv_fan_out(conv: nn.modules.conv._ConvNd) -> float:
    """Synapses from one input of `conv`: each output channel of its group, over the kernel's positions that
    cover it (a transposed conv scatters each input over the whole kernel)."""
    per_group = conv.out_channels / conv.groups * math.prod(conv.kernel_size)
    return per_group if conv.transposed else per_group / math.prod(conv.stride)


@torch.inference_mode()
def count_macs(model: nn.Module, sample: torch.Tensor) -> dict[str, int]:
    """Multiply-accumulates per image of every conv / linear layer (a grouped conv: in_channels / groups per
    output) and of every matrix product of two activations (attention's, an analog operator of the canonical
    network: its inner dimension per output), measured with forward hooks."""
    macs, hooks = {}, []

    def hook(name):
        def record(module, inputs, output):
            if isinstance(module, Analog):
                per_output = inputs[0].shape[-1]
            elif isinstance(module, CONVS):
                per_output = module.in_channels // module.groups * math.prod(module.kernel_size)
            else:
                per_output = module.in_features
            macs[name] = output[0].numel() * per_output
        return record

    for name, module in model.named_modules():
        if isinstance(module, CONVS | nn.Linear) or isinstance(module, Analog) and module.function in MATRIX_PRODUCTS:
            hooks.append(module.register_forward_hook(hook(name)))
    model.eval()(sample[:1].to(device_of(model)))
    for h in hooks:
        h.remove()
    return macs
