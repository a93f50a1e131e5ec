"""convert.nonlinear=compensate: the rewrite of a traced model that `canonicalize` runs last. Each operation that
snnbench.core.analog computes (and that nothing before rewrote) becomes a call of an `Analog` module, and each
analog operator whose output reaches a weight layer (conv, linear) or a product through linear maps gets a
`Reencode` spiking layer right after it, which every reader of its output then reads. So does the input of a weight
layer or a product that another weight layer's output reaches through linear maps only (x + project(y) into the
next conv, as in inverted bottlenecks, whose activation-free projections are common beside these functions):
weight layers stay driven by events, and only the nonlinear functions themselves are analog."""

import torch
import torch.fx
from torch import nn

from snnbench.core.analog import Analog, Reencode, Slot, computes_analog, is_product
from snnbench.core.graph import (
    CanonicalGraph,
    _describe,
    _scope,
    _set_module,
    _source_line,
    reached,
    unique_name,
    value_nodes,
)

WEIGHT_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
WEIGHT_FUNCTIONS = {torch.nn.functional.linear, torch.nn.functional.conv1d, torch.nn.functional.conv2d,
                    torch.nn.functional.conv3d}


def compensate(gm: torch.fx.GraphModule, result: CanonicalGraph):
    """Rewrite `gm` in place (the caller lints and recompiles it): analog operators into result.analog, the
    re-encoding layers into result.layers (spiking layers, all in the order they run)."""
    modules, values, calls = dict(gm.named_modules()), value_nodes(gm.graph), {}
    analog_nodes = []
    for node in list(gm.graph.nodes):
        module = modules.get(node.target) if node.op == "call_module" else None
        if not computes_analog(node, module, values):
            continue
        origin = f"{_describe(node, module)}{_source_line(node)}"
        analog_nodes.append(_as_analog(gm, node, module, values, calls))
        result.analog[analog_nodes[-1].target] = origin
    modules = dict(gm.named_modules())
    for node in analog_nodes:
        if _reaches_weights(node, modules):
            _reencode(gm, node, f"{node.target}_spikes", result, f"signed re-encoding of analog {node.target}")
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        for value in _inputs_driven_by_weights(node, modules):
            name = _reencode(gm, value, f"{_scope(value)}{value.name}_spikes", result,
                             f"signed re-encoding of {value.name} (weight layer outputs)")
            modules[name] = gm.get_submodule(name)
    order = [node.target for node in gm.graph.nodes if node.op == "call_module"]
    result.layers = {name: result.layers[name] for name in order if name in result.layers}  # the order they run


def _reencode(gm: torch.fx.GraphModule, node: torch.fx.Node, base: str, result: CanonicalGraph, origin: str) -> str:
    """A Reencode layer right after `node`, which every other reader of `node` reads instead; returns its name."""
    name = unique_name(gm, base)
    gm.add_submodule(name, Reencode())
    with gm.graph.inserting_after(node):
        spikes = gm.graph.call_module(name, (node,))
    node.replace_all_uses_with(spikes, delete_user_cb=lambda user: user is not spikes)
    result.layers[name] = origin
    return name


def _as_analog(gm: torch.fx.GraphModule, node: torch.fx.Node, module, values: set, calls: dict) -> torch.fx.Node:
    """`node` replaced by a call of an Analog module computing the same, its tensor inputs (computed or constant)
    passed in as arguments; returns the new call."""
    inputs = []

    def slot(arg: torch.fx.Node) -> Slot:
        if arg not in inputs:
            inputs.append(arg)
        return Slot(inputs.index(arg))

    args = torch.fx.node.map_arg(node.args, slot)
    kwargs = torch.fx.node.map_arg(node.kwargs, slot)
    running = tuple(arg in values for arg in inputs)
    analog = Analog(module if module is not None else node.target, tuple(args), dict(kwargs), running,
                    is_product(node, values))
    if module is not None:  # a module keeps its name for its first call, its later calls are <name>_call2, ...
        calls[node.target] = calls.get(node.target, 0) + 1
        name = node.target if calls[node.target] == 1 else unique_name(gm, f"{node.target}_call{calls[node.target]}")
    else:
        base = node.target if isinstance(node.target, str) else node.target.__name__
        name = unique_name(gm, f"{_scope(node)}{base}")
    if name == node.target:
        _set_module(gm, name, analog)
    else:
        gm.add_submodule(name, analog)
    with gm.graph.inserting_after(node):
        call = gm.graph.call_module(name, tuple(inputs))
    node.replace_all_uses_with(call)
    values.add(call)  # read by the products after it
    gm.graph.erase_node(node)
    return call


def _reaches_weights(node: torch.fx.Node, modules: dict) -> bool:
    """Whether the output of `node` reaches a weight layer or a product through linear maps only (not through a
    spiking layer or another analog operator, which take it as it is)."""
    def passes(user) -> bool:
        return not (_is_weight_layer(user, modules) or isinstance(_module(user, modules), nn.ReLU | Analog)
                    or user.op == "output")

    return any(_is_weight_layer(user, modules) or _is_product(user, modules)
               for user in reached(node.users, lambda user: user.users, passes))


def _inputs_driven_by_weights(node: torch.fx.Node, modules: dict) -> list[torch.fx.Node]:
    """The inputs of a weight layer or a product `node` (none for any other node) that the output of a weight
    layer reaches through linear maps only."""
    if _is_weight_layer(node, modules):
        inputs = node.args[:1]
    elif _is_product(node, modules):
        inputs = node.args
    else:
        return []
    return [value for value in dict.fromkeys(inputs) if _driven_by_weights(value, modules)]


def _driven_by_weights(value: torch.fx.Node, modules: dict) -> bool:
    def passes(node) -> bool:  # not where a spiking layer or an analog operator drives it
        return not (_is_weight_layer(node, modules) or isinstance(_module(node, modules), nn.ReLU | Analog))

    return any(_is_weight_layer(node, modules) for node in reached([value], lambda node: node.all_input_nodes, passes))


def _module(node: torch.fx.Node, modules: dict) -> nn.Module | None:
    return modules.get(node.target) if node.op == "call_module" else None


def _is_weight_layer(node: torch.fx.Node, modules: dict) -> bool:
    return (isinstance(_module(node, modules), WEIGHT_MODULES)
            or (node.op == "call_function" and node.target in WEIGHT_FUNCTIONS))


def _is_product(node: torch.fx.Node, modules: dict) -> bool:
    module = _module(node, modules)
    return isinstance(module, Analog) and module.product


def restore_analog_calls(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """`gm` (changed in place) with each call of an Analog module replaced by the call it computes (the module it
    wraps, under the same name, the function or the Tensor method), its Slots filled with the call's arguments:
    the inverse of compensate's rewrite (a network trained with its spiking layers in place, train.activation=
    spikezip, canonicalises into the same network again)."""
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        analog = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(analog, Analog):
            continue

        def filled(arg, node=node):
            return node.args[arg.index] if isinstance(arg, Slot) else arg

        args = torch.fx.node.map_aggregate(analog.args, filled)
        kwargs = torch.fx.node.map_aggregate(analog.kwargs, filled)
        with gm.graph.inserting_before(node):
            if isinstance(analog.function, nn.Module):
                _set_module(gm, node.target, analog.function)
                call = gm.graph.call_module(node.target, args, kwargs)
            elif isinstance(analog.function, str):
                call = gm.graph.call_method(analog.function, args, kwargs)
            else:
                call = gm.graph.call_function(analog.function, args, kwargs)
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return gm
