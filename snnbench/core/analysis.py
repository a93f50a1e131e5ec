"""What a canonical network costs: synapses per neuron (fan-out) and multiply-accumulates per image."""

import torch
from torch import nn

from snnbench.core.graph import device_of, trace


def fan_out(model: nn.Module) -> dict[str, float]:
    """Synapses per neuron of each ReLU layer of a canonical network: for every conv it reaches through linear
    ops (pooling, padding, additions, flattening) C_out * k^2 / stride^2, for a linear layer its outputs, and 1
    for an identity path into another neuron (a residual shortcut)."""
    modules = dict(model.named_modules())
    result = {}
    for node in trace(model).graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], nn.ReLU):
            continue
        total, frontier, seen = 0.0, list(node.users), set()
        while frontier:
            user = frontier.pop()
            if user in seen:
                continue
            seen.add(user)
            target = modules.get(user.target) if user.op == "call_module" else None
            if isinstance(target, nn.Conv2d):
                kh, kw = target.kernel_size
                total += target.out_channels * kh * kw / (target.stride[0] * target.stride[1])
            elif isinstance(target, nn.Linear):
                total += target.out_features
            elif isinstance(target, nn.ReLU):
                total += 1.0
            elif user.op != "output":
                frontier.extend(user.users)
        result[node.target] = total
    return result


@torch.inference_mode()
def count_macs(model: nn.Module, sample: torch.Tensor) -> dict[str, int]:
    """Multiply-accumulates per image of every conv / linear layer, measured with forward hooks."""
    macs, hooks = {}, []

    def hook(name):
        def record(module, inputs, output):
            per_output = (module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
                          if isinstance(module, nn.Conv2d) else module.in_features)
            macs[name] = output[0].numel() * per_output
        return record

    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            hooks.append(module.register_forward_hook(hook(name)))
    model.eval()(sample[:1].to(device_of(model)))
    for h in hooks:
        h.remove()
    return macs
