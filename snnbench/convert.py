"""ANN -> SNN graph surgery: BN folding, max-pool policy, ReLU -> neuron replacement, fan-out and MAC counts."""

import copy

import torch
import torch.fx
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from snnbench.errors import UserError


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of `model` with every BatchNorm merged into the conv/linear layer that feeds it (found in the
    traced graph), so the folded network computes the same logits with one affine layer fewer."""
    model = copy.deepcopy(model).eval()
    graph = torch.fx.symbolic_trace(model).graph
    modules = dict(model.named_modules())
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], nn.BatchNorm1d | nn.BatchNorm2d):
            continue
        source = node.args[0]
        if not (isinstance(source, torch.fx.Node) and source.op == "call_module" and len(source.users) == 1):
            raise UserError(f"cannot fold {node.target}: it does not directly follow a conv/linear layer")
        layer = modules[source.target]
        fuse = fuse_conv_bn_eval if isinstance(layer, nn.Conv2d) else fuse_linear_bn_eval
        _set_module(model, source.target, fuse(layer, modules[node.target]))
        _set_module(model, node.target, nn.Identity())
    return model


def check_maxpool_policy(model: nn.Module, policy: str) -> list[str]:
    """Names of the max-pooling layers, which have no exact spiking form: refused unless policy 'avg'."""
    names = [name for name, module in model.named_modules() if isinstance(module, nn.MaxPool2d)]
    if names and policy != "avg":
        raise UserError(f"the model uses max pooling ({names[0]}), which has no exact spiking form: "
                        "add convert.maxpool=avg to replace it by average pooling")
    return names


def apply_maxpool_policy(model: nn.Module, policy: str) -> nn.Module:
    """Refuse max pooling, or (policy 'avg') swap in average pooling."""
    for name in check_maxpool_policy(model, policy):
        module = model.get_submodule(name)
        _set_module(model, name, nn.AvgPool2d(module.kernel_size, module.stride, module.padding))
    return model


def relu_names(model: nn.Module) -> list[str]:
    """Names of the ReLU modules, in the order they run; each becomes one spiking layer."""
    modules = dict(model.named_modules())
    graph = torch.fx.symbolic_trace(model).graph
    return [n.target for n in graph.nodes if n.op == "call_module" and isinstance(modules[n.target], nn.ReLU)]


def replace_modules(model: nn.Module, replacements: dict[str, nn.Module]) -> nn.Module:
    model = copy.deepcopy(model)
    for name, module in replacements.items():
        _set_module(model, name, module)
    return model


def fan_out(model: nn.Module) -> dict[str, float]:
    """Synapses per neuron of each ReLU layer: for every conv it reaches through linear ops (pooling, padding,
    additions, flattening) C_out * k^2 / stride^2, for a linear layer its outputs, and 1 for an identity
    path into another neuron (a residual shortcut)."""
    modules = dict(model.named_modules())
    graph = torch.fx.symbolic_trace(model).graph
    result = {}
    for node in graph.nodes:
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


def device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


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


def _set_module(model: nn.Module, name: str, module: nn.Module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
