"""The traced graph. `canonicalize` traces a model once (torch.fx) and rewrites it into the canonical network that
every later stage reads: each ReLU call site (a module, also reused or in-place, `F.relu`, `torch.relu`,
`Tensor.relu` / `relu_`) is a ReLU module of its own with a stable name, the spiking layer it becomes;
BatchNorm is folded into the conv / linear layer that feeds it; Dropout is gone; max pooling is refused or
replaced by average pooling. Every other node must be a linear map (conv, linear, pooling, flatten, addition,
concatenation, padding, slicing, reshaping, identity, scaling by a constant), or the model is refused naming
the node. Also here: fan-out and MAC counts, which read the canonical graph."""

import copy
import operator
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from snnbench.core.neurons import IFNeuron
from snnbench.errors import UserError
from snnbench.models.normalize import Normalize
from snnbench.models.qcfs import QCFS

RELU_FUNCTIONS = {F.relu: "F.relu", torch.relu: "torch.relu", torch.relu_: "torch.relu_", F.relu_: "F.relu_"}
RELU_METHODS = {"relu": "Tensor.relu", "relu_": "Tensor.relu_"}
DROPOUT_AS_MODULES = {F.dropout: nn.Dropout, F.dropout1d: nn.Dropout1d, F.dropout2d: nn.Dropout2d,
                      F.dropout3d: nn.Dropout3d, F.alpha_dropout: nn.AlphaDropout,
                      F.feature_alpha_dropout: nn.FeatureAlphaDropout}
DROPOUT_FUNCTIONS = set(DROPOUT_AS_MODULES)
DROPOUT_MODULES = tuple(DROPOUT_AS_MODULES.values())
MAX_POOLS = {nn.MaxPool2d: "nn.MaxPool2d", nn.AdaptiveMaxPool2d: "nn.AdaptiveMaxPool2d"}
MAX_POOL_FUNCTIONS = {F.max_pool2d: "F.max_pool2d", F.adaptive_max_pool2d: "F.adaptive_max_pool2d"}
# the linear maps a spiking network computes as they are, once per chunk of time steps
LINEAR_MODULES = (nn.Conv2d, nn.Linear, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Unflatten, nn.Identity,
                  nn.ZeroPad2d, Normalize)
LINEAR_FUNCTIONS = {operator.add, operator.sub, operator.neg, operator.getitem, torch.add, torch.sub, torch.cat,
                    torch.flatten, torch.mean, torch.sum, torch.reshape, F.avg_pool2d, F.adaptive_avg_pool2d, getattr}
LINEAR_METHODS = {"add", "add_", "sub", "view", "reshape", "flatten", "size", "contiguous", "mean", "sum", "squeeze",
                  "unsqueeze", "permute", "transpose", "expand_as", "chunk", "split"}
SCALINGS = {operator.mul, operator.truediv, torch.mul, torch.div}  # linear when the other operand is a constant
IN_PLACE_METHODS = {"relu_", "add_"}


class _Tracer(torch.fx.Tracer):
    """torch.fx's tracer, with the source line of every node; snnbench's input normalisation, QCFS activations
    and spiking neurons stay one call each."""

    def __init__(self):
        super().__init__()
        self.record_stack_traces = True

    def is_leaf_module(self, module: nn.Module, name: str) -> bool:
        return isinstance(module, Normalize | QCFS | IFNeuron) or super().is_leaf_module(module, name)


def trace(model: nn.Module) -> torch.fx.GraphModule:
    """`model` as a GraphModule (the same submodules and state_dict keys), or a UserError if fx cannot trace it."""
    try:
        graph = _Tracer().trace(model)
    except Exception as err:  # control flow on tensor values, unsupported Python, ...
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"torch.fx cannot trace {type(model).__name__} ({first}): snnbench converts models whose "
                        "forward has no control flow that depends on tensor values; see docs/models.md") from err
    return torch.fx.GraphModule(model, graph, class_name=type(model).__name__)


@dataclass
class CanonicalGraph:
    """A canonical network and what canonicalisation did to the model it came from (`snnbench inspect`)."""
    module: torch.fx.GraphModule
    layers: dict[str, str]                             # spiking layer name -> the call it came from
    folded: list[str] = field(default_factory=list)    # "bn -> conv" for each BatchNorm folded
    removed: list[str] = field(default_factory=list)   # Dropout calls
    replaced: list[str] = field(default_factory=list)  # max poolings swapped for average pooling


def canonicalize(model: nn.Module, maxpool: str = "error") -> CanonicalGraph:
    """The canonical network of `model` in eval mode (a new module; `model` is not changed). `maxpool`: 'error'
    refuses max pooling, 'avg' replaces it by average pooling. Refuses, naming the node, any operation that is
    neither a ReLU nor a linear map."""
    model = copy.deepcopy(model).eval()
    # a model traced already (snnbench puts the input normalisation in front that way) keeps its graph, whose
    # nodes know the user's source lines
    gm = model if isinstance(model, torch.fx.GraphModule) else trace(model)
    modules = dict(gm.named_modules())
    refusal = first_refused_node(gm, maxpool)
    if refusal:
        raise UserError(refusal)
    result = CanonicalGraph(gm, {})
    graph = gm.graph
    for node in list(graph.nodes):
        module = modules.get(node.target) if node.op == "call_module" else None
        if _is_in_place(node, module):
            _later_users_read(node)
        if isinstance(module, DROPOUT_MODULES) or (node.op == "call_function" and node.target in DROPOUT_FUNCTIONS):
            result.removed.append(_describe(node, module))
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
        elif isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
            source = node.args[0]
            layer = modules[source.target]
            fuse = fuse_conv_bn_eval if isinstance(layer, nn.Conv2d) else fuse_linear_bn_eval
            _set_module(gm, source.target, fuse(layer, module))
            result.folded.append(f"{node.target} -> {source.target}")
            node.replace_all_uses_with(source)
            graph.erase_node(node)
        elif _max_pool(node, module) is not None:
            result.replaced.append(_replace_max_pool(gm, node, module))
    _name_spiking_layers(gm, result)
    graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return result


def trainable_trace(model: nn.Module) -> torch.fx.GraphModule:
    """`model` traced (the same submodules and state_dict keys) so that the graph trains as the model did:
    functional dropout becomes a Dropout module, which follows train() and eval() (fx records F.dropout's
    `training` argument as the constant it was while tracing)."""
    gm = model if isinstance(model, torch.fx.GraphModule) else trace(model)
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target in DROPOUT_AS_MODULES:
            probability = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5)
            name = unique_name(gm, f"{_scope(node)}{node.name}")
            gm.add_submodule(name, DROPOUT_AS_MODULES[node.target](probability))
            with graph.inserting_after(node):
                node.replace_all_uses_with(graph.call_module(name, (node.args[0],)))
            graph.erase_node(node)
    gm.recompile()
    return gm


def with_average_pooling(model: nn.Module) -> nn.Module:
    """`model` with every max pooling replaced by average pooling over the same windows (convert.maxpool=avg),
    as a traced graph with the same state_dict; `model` itself if it has none. Trained this way, the ANN is the
    network that converts."""
    gm = trainable_trace(copy.deepcopy(model))
    modules = dict(gm.named_modules())
    pools = [(node, modules.get(node.target) if node.op == "call_module" else None) for node in gm.graph.nodes]
    pools = [(node, module) for node, module in pools if _max_pool(node, module) is not None]
    if not pools:
        return model
    for node, module in pools:
        _replace_max_pool(gm, node, module)
    gm.graph.lint()
    gm.recompile()
    return gm


def first_refused_node(gm: torch.fx.GraphModule, maxpool: str = "error") -> str | None:
    """Why the traced `gm` cannot be converted, naming the first node that stands in the way (None: it can)."""
    modules = dict(gm.named_modules())
    for node in gm.graph.nodes:
        module = modules.get(node.target) if node.op == "call_module" else None
        if node.op in ("placeholder", "output", "get_attr") or _is_relu(node, module):
            continue
        if isinstance(module, DROPOUT_MODULES) or (node.op == "call_function" and node.target in DROPOUT_FUNCTIONS):
            continue
        where = f"{_describe(node, module)}{_source_line(node)}"
        if _max_pool(node, module) is not None:
            if maxpool != "avg":
                return (f"the model uses max pooling ({where}), which has no exact spiking form: add "
                        "convert.maxpool=avg to replace it by average pooling")
            continue
        if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
            source = node.args[0]
            layer = modules.get(source.target) if source.op == "call_module" else None
            calls = sum(n.op == "call_module" and n.target == source.target for n in gm.graph.nodes)
            if not isinstance(layer, nn.Conv2d | nn.Linear) or len(source.users) > 1 or calls > 1:
                return (f"cannot fold BatchNorm {where}: it must directly follow a conv or linear layer whose "
                        "output nothing else reads (put the BatchNorm right after its nn.Conv2d / nn.Linear)")
            continue
        if _is_linear(node, module):
            continue
        return (f"cannot convert {where}: a spiking network computes ReLUs and linear maps only (conv, linear, "
                "pooling, flatten, addition, concatenation, padding, slicing); replace this operation by a ReLU "
                "or a linear map, and retrain")
    return None


def _is_relu(node, module) -> bool:
    return (isinstance(module, nn.ReLU) or (node.op == "call_function" and node.target in RELU_FUNCTIONS)
            or (node.op == "call_method" and node.target in RELU_METHODS))


def _is_linear(node, module) -> bool:
    if node.op == "call_module":
        return isinstance(module, LINEAR_MODULES)
    if node.op == "call_function" and node.target is F.pad:
        mode = node.kwargs.get("mode", node.args[2] if len(node.args) > 2 else "constant")
        value = node.kwargs.get("value", node.args[3] if len(node.args) > 3 else None)
        return mode == "constant" and not value
    if node.op == "call_function" and node.target in SCALINGS or node.op == "call_method" and node.target in (
            "mul", "div"):
        # x * c and x / c for a constant c (a number or a buffer); x * y of two computed tensors is not linear
        def constant(arg):
            return not isinstance(arg, torch.fx.Node) or arg.op == "get_attr"
        first, second = node.args[:2]
        if node.target in (operator.truediv, torch.div, "div"):
            return constant(second)
        return constant(first) or constant(second)
    return (node.op == "call_function" and node.target in LINEAR_FUNCTIONS
            or node.op == "call_method" and node.target in LINEAR_METHODS)


def _is_in_place(node, module) -> bool:
    if isinstance(module, nn.ReLU) and module.inplace:
        return True
    if node.op == "call_method":
        return node.target in IN_PLACE_METHODS
    return node.op == "call_function" and (node.target in (torch.relu_, F.relu_) or node.kwargs.get("inplace") is True)


def _later_users_read(node: torch.fx.Node):
    """An in-place call changed its input tensor: the nodes after it that read that tensor read its result."""
    source = node.args[0]
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    for user in list(source.users):
        if user is not node and order[user] > order[node]:
            user.replace_input_with(source, node)


def _max_pool(node, module):
    if node.op == "call_module" and type(module) in MAX_POOLS:
        return MAX_POOLS[type(module)]
    if node.op == "call_function" and node.target in MAX_POOL_FUNCTIONS:
        return MAX_POOL_FUNCTIONS[node.target]
    return None


def _replace_max_pool(gm, node, module) -> str:
    """Max pooling -> average pooling over the same windows (convert.maxpool=avg): a module in its place, a
    functional call by a module named after it. Returns what was replaced."""
    origin = _describe(node, module)
    if module is None:  # the functional form: its arguments as a module's
        names = ("kernel_size", "stride", "padding") if node.target is F.max_pool2d else ("output_size",)
        options = {**dict(zip(names, node.args[1:], strict=False)), **node.kwargs}
        module = (nn.MaxPool2d(**{k: options[k] for k in names if k in options})
                  if node.target is F.max_pool2d else nn.AdaptiveMaxPool2d(options["output_size"]))
        name = unique_name(gm, f"{_scope(node)}avg_pool")
        with gm.graph.inserting_after(node):
            node.replace_all_uses_with(gm.graph.call_module(name, (node.args[0],)))
        gm.graph.erase_node(node)
    else:
        name = node.target
    if isinstance(module, nn.AdaptiveMaxPool2d):
        average = nn.AdaptiveAvgPool2d(module.output_size)
    else:
        average = nn.AvgPool2d(module.kernel_size, module.stride, module.padding, ceil_mode=module.ceil_mode)
    gm.add_submodule(name, average)
    return f"{origin} -> average pooling"


def _name_spiking_layers(gm: torch.fx.GraphModule, result: CanonicalGraph):
    """Each ReLU call site becomes a call of a ReLU module of its own: a module keeps its name for its first call,
    its later calls are <name>_call2, _call3, ...; a functional call is named relu, relu_1, ... within the module
    whose forward makes it."""
    modules, calls = dict(gm.named_modules()), {}
    for node in list(gm.graph.nodes):
        module = modules.get(node.target) if node.op == "call_module" else None
        if not _is_relu(node, module):
            continue
        if module is not None:
            calls[node.target] = calls.get(node.target, 0) + 1
            if calls[node.target] == 1:
                module.inplace = False  # its in-place effect is in the graph now (_later_users_read)
                result.layers[node.target] = f"nn.ReLU {node.target}"
                continue
            name = unique_name(gm, f"{node.target}_call{calls[node.target]}")
            origin = f"nn.ReLU {node.target}, call {calls[node.target]}"
        else:
            name = unique_name(gm, f"{_scope(node)}relu")
            origin = (RELU_FUNCTIONS[node.target] if node.op == "call_function" else RELU_METHODS[node.target])
            origin += _source_line(node)
        gm.add_submodule(name, nn.ReLU())
        with gm.graph.inserting_after(node):
            relu = gm.graph.call_module(name, (node.args[0],))
        node.replace_all_uses_with(relu)
        gm.graph.erase_node(node)
        result.layers[name] = origin


def unique_name(gm: nn.Module, base: str) -> str:
    taken = dict(gm.named_modules())
    name, k = base, 0
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    return name


def _scope(node) -> str:
    """The module path (with a trailing dot) whose forward made this call, '' at the top."""
    stack = list(node.meta.get("nn_module_stack", {}))
    return re.sub(r"@\d+$", "", stack[-1]) + "." if stack else ""  # 'block.relu@1': its second call


def _describe(node, module) -> str:
    if module is not None:
        kind = type(module)
        origin = "nn" if kind.__module__.startswith("torch.nn") else kind.__module__
        return f"{node.target} ({origin}.{kind.__name__})"
    if node.op == "call_method":
        return f"node {node.name} (Tensor.{node.target})"
    target = getattr(node.target, "__name__", str(node.target))
    module_name = getattr(node.target, "__module__", None) or "torch"
    return f"node {node.name} ({module_name.replace('torch.nn.functional', 'F')}.{target})"


def _source_line(node) -> str:
    """', file.py:12' for the user's line that made this node, when fx recorded it (not torch's own frames)."""
    torch_dir = f"{Path(torch.__file__).parent}{os.sep}"
    frames = re.findall(r'File "([^"]+)", line (\d+)', node.stack_trace or "")
    user = [(f, line) for f, line in frames if not f.startswith(torch_dir)]
    return f" at {Path(user[-1][0]).name}:{user[-1][1]}" if user else ""


def spiking_layer_names(model: nn.Module) -> list[str]:
    """The ReLU modules of a canonical network (each called once), in the order they run: its spiking layers."""
    modules = dict(model.named_modules())
    nodes = [n for n in trace(model).graph.nodes if n.op == "call_module" and isinstance(modules[n.target], nn.ReLU)]
    names = [n.target for n in nodes]
    if len(set(names)) < len(names):
        raise ValueError("a ReLU module is called more than once: canonicalize the model first")
    return names


def replace_modules(model: nn.Module, replacements: dict[str, nn.Module]) -> nn.Module:
    model = copy.deepcopy(model)
    for name, module in replacements.items():
        _set_module(model, name, module)
    return model


def device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _set_module(model: nn.Module, name: str, module: nn.Module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def with_input_normalization(model: nn.Module, normalize: Normalize) -> nn.Module:
    """`model` traced (the same submodules and state_dict keys) with `normalize` applied to its input first."""
    from snnbench.core.graph import trainable_trace, unique_name

    gm = trainable_trace(model)
    graph = gm.graph
    name = unique_name(gm, "normalize")
    gm.add_submodule(name, normalize)
    image = next(node for node in graph.nodes if node.op == "placeholder")
    with graph.inserting_after(image):
        normalized = graph.call_module(name, (image,))
    image.replace_all_uses_with(normalized, delete_user_cb=lambda user: user is not normalized)
    graph.lint()
    gm.recompile()
    return gm
