"""The traced graph. `canonicalize` traces a model once (torch.fx) and rewrites it into the canonical network that
every later stage reads. Only nodes whose value depends on the input's values are judged (value_nodes: sizes,
arithmetic and assertions on sizes pass through); kind_of says what each is:
- a ReLU-family activation, each call site (a module, also reused or in-place, or a function / method) a spiking
  layer of its own with a stable name: a ReLU an nn.ReLU, a clipped ReLU (ReLU6, hardtanh(0, a), clamp(0, a)) a
  ClippedReLU that knows its clip, a leaky ReLU / PReLU the pair max(x, 0) - slope * max(-x, 0) of two ReLU layers;
- a linear map (conv, linear, pooling, flattening, addition, concatenation, padding, slicing, reshaping,
  interpolation, scaling by a constant; module, function and method forms), kept as it is;
- BatchNorm, an affine map: folded into the conv / linear layer that feeds it, or kept where it follows anything
  else; Dropout, removed; max pooling, refused or replaced by average pooling; a softmax, log_softmax or sigmoid
  that ends a classifier, removed (the argmax is the same);
- anything else is nonlinear: refused naming the node and convert.nonlinear=compensate (nonlinear_refusal, the one
  place such a node is judged), or left to snnbench.core.compensate with that option.
Any unexpected failure while rewriting a node is refused naming the node."""

import contextlib
import copy
import operator
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval
from torchvision.ops import StochasticDepth

from snnbench.core.analog import Analog, Reencode, computes_analog
from snnbench.core.attention import with_traceable_transformers
from snnbench.core.stepped import Stepped, broadcast_over_sample
from snnbench.errors import UserError, first_line
from snnbench.models.normalize import Normalize
from snnbench.models.qcfs import QCFS
from snnbench.models.spikezip import SpikeZIPQuantizer

RELU_FUNCTIONS = {F.relu: "F.relu", torch.relu: "torch.relu", torch.relu_: "torch.relu_", F.relu_: "F.relu_"}
RELU_METHODS = {"relu": "Tensor.relu", "relu_": "Tensor.relu_"}
# clip(x, lower, upper), a clipped ReLU when the lower end is 0 (and a ReLU without an upper end)
HARDTANH_FUNCTIONS = {F.hardtanh: "F.hardtanh", F.hardtanh_: "F.hardtanh_", F.relu6: "F.relu6"}
CLAMP_FUNCTIONS = {torch.clamp: "torch.clamp", torch.clip: "torch.clip", torch.clamp_: "torch.clamp_",
                   torch.clamp_min: "torch.clamp_min", torch.clamp_min_: "torch.clamp_min_"}
CLAMP_METHODS = {"clamp", "clamp_", "clip", "clip_", "clamp_min", "clamp_min_"}
LEAKY_FUNCTIONS = {F.leaky_relu: "F.leaky_relu", F.leaky_relu_: "F.leaky_relu_", F.prelu: "F.prelu",
                   torch.prelu: "torch.prelu"}
DROPOUT_AS_MODULES = {F.dropout: nn.Dropout, F.dropout1d: nn.Dropout1d, F.dropout2d: nn.Dropout2d,
                      F.dropout3d: nn.Dropout3d, F.alpha_dropout: nn.AlphaDropout,
                      F.feature_alpha_dropout: nn.FeatureAlphaDropout}
DROPOUT_FUNCTIONS = set(DROPOUT_AS_MODULES)
# torchvision's stochastic depth (Swin, EfficientNet, ConvNeXt) drops whole paths in training, like dropout: one
# call of its module (a leaf of the trace), which follows train() and eval()
DROPOUT_MODULES = (*DROPOUT_AS_MODULES.values(), StochasticDepth)
MAX_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)
MAX_POOL_FUNCTIONS = {F.max_pool1d: nn.MaxPool1d, F.max_pool2d: nn.MaxPool2d,
                      F.adaptive_max_pool1d: nn.AdaptiveMaxPool1d, F.adaptive_max_pool2d: nn.AdaptiveMaxPool2d}
POOL_OPTIONS = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
ADAPTIVE_POOL_OPTIONS = ("output_size", "return_indices")
# the linear maps a spiking network computes as they are, once per chunk of time steps
LINEAR_MODULES = (nn.modules.conv._ConvNd, nn.Linear, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
                  nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.Flatten, nn.Unflatten,
                  nn.Identity, nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.Upsample, nn.PixelShuffle,
                  nn.PixelUnshuffle, nn.ChannelShuffle, Normalize)
LINEAR_FUNCTIONS = {operator.add, operator.sub, operator.neg, operator.pos, operator.getitem, torch.add, torch.sub,
                    torch.neg, torch.cat, torch.concat, torch.concatenate, torch.stack, torch.flatten, torch.mean,
                    torch.sum, torch.reshape, torch.split, torch.chunk, torch.unbind, torch.transpose,
                    torch.permute, torch.movedim, torch.swapaxes, torch.squeeze, torch.unsqueeze, torch.narrow,
                    torch.flip, torch.roll, torch.t, torch.channel_shuffle, F.avg_pool1d, F.avg_pool2d,
                    F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
                    F.interpolate, F.upsample, F.pixel_shuffle, F.pixel_unshuffle, getattr}
LINEAR_METHODS = {"add", "add_", "sub", "sub_", "neg", "view", "view_as", "reshape", "reshape_as", "flatten",
                  "contiguous", "clone", "mean", "sum", "squeeze", "unsqueeze", "permute", "transpose", "t",
                  "movedim", "swapaxes", "expand", "expand_as", "repeat", "chunk", "split", "unbind", "narrow",
                  "flip", "roll", "select"}
# linear in their first argument when the weights (every other tensor argument) are constants
WEIGHTED_FUNCTIONS = {F.linear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d,
                      F.conv_transpose3d}
WEIGHT_LAYER_FUNCTIONS = {F.linear: nn.Linear, F.conv1d: nn.Conv1d, F.conv2d: nn.Conv2d, F.conv3d: nn.Conv3d}
SCALINGS = {operator.mul, operator.truediv, operator.matmul, torch.mul, torch.div, torch.matmul}
SCALING_METHODS = {"mul", "mul_", "div", "div_", "matmul"}
DIVISIONS = {operator.truediv, torch.div, "div", "div_"}
# the network's output through these is the same argmax: removed where they end a classifier
MONOTONE_ENDINGS = {F.softmax: "F.softmax", torch.softmax: "torch.softmax", F.log_softmax: "F.log_softmax",
                    torch.log_softmax: "torch.log_softmax", torch.sigmoid: "torch.sigmoid", F.sigmoid: "F.sigmoid"}
MONOTONE_ENDING_METHODS = {"softmax", "log_softmax", "sigmoid"}
MONOTONE_ENDING_MODULES = (nn.Softmax, nn.LogSoftmax, nn.Sigmoid)
# nodes that read a tensor's size, not its values
SIZE_METHODS = {"size", "dim", "ndimension", "numel", "nelement", "get_device"}
SIZE_ATTRIBUTES = {"shape", "ndim", "dtype", "device", "is_cuda", "layout"}
IN_PLACE_FUNCTIONS = {torch.relu_, F.relu_, F.hardtanh_, F.leaky_relu_, torch.clamp_, torch.clamp_min_}

# what a node is (kind_of); every later stage reads the canonical graph these become
PASSES = "passes"            # the input, constants, operations on sizes: nothing to convert
ACTIVATION = "activation"    # ReLU, clipped ReLU, leaky ReLU: spiking layers
LINEAR = "linear"
AFFINE = "affine"            # BatchNorm: folded into the conv / linear layer before it, or kept as it is
DROPOUT = "dropout"
MAX_POOL = "max_pool"
ENDING = "ending"            # softmax / log_softmax / sigmoid that ends a classifier
NONLINEAR = "nonlinear"      # none of these: no exact spiking form


class ClippedReLU(nn.ReLU):
    """min(max(x, 0), clip) (ReLU6, hardtanh(0, a), clamp(x, 0, a)): a spiking layer whose neurons' threshold never
    exceeds the clip, so that their rate saturates where the activation does."""

    def __init__(self, clip: float):
        super().__init__()
        self.clip = float(clip)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(x, 0.0, self.clip)

    def extra_repr(self) -> str:
        return f"clip={self.clip:g}"


class ChannelScale(nn.Module):
    """x times a constant per channel (dim 1), or one constant: the slope of a leaky ReLU's negative part."""

    def __init__(self, scale: torch.Tensor):
        super().__init__()
        self.register_buffer("scale", torch.as_tensor(scale, dtype=torch.float32).detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * broadcast_over_sample(self.scale, x.dim() - 1)


LINEAR_MODULES = (*LINEAR_MODULES, ChannelScale)


@dataclass
class Activation:
    """A ReLU-family call: max(x, 0), clipped at `clip` (None: not clipped), with `slope` times x below 0 (None:
    0)."""
    origin: str                               # the call, as inspect shows it
    clip: float | None = None
    slope: float | torch.Tensor | None = None


class _Tracer(torch.fx.Tracer):
    """torch.fx's tracer, with the source line of every node; snnbench's input normalisation, QCFS activations,
    SpikeZIP-TF quantisers, clipped ReLUs and channel scales, spiking neurons and analog operators, and
    torchvision's stochastic depth stay one call each."""

    def __init__(self):
        super().__init__()
        self.record_stack_traces = True

    def is_leaf_module(self, module: nn.Module, name: str) -> bool:
        return (isinstance(module, Normalize | QCFS | SpikeZIPQuantizer | ClippedReLU | ChannelScale | Stepped | Analog
                           | Reencode | StochasticDepth)
                or super().is_leaf_module(module, name))


def trace(model: nn.Module) -> torch.fx.GraphModule:
    """`model` as a GraphModule (the same submodules and state_dict keys), or a UserError if fx cannot trace it."""
    try:
        graph = _Tracer().trace(model)
    except UserError:  # a part of the model that says itself why it cannot be converted
        raise
    except Exception as err:  # control flow on tensor values, unsupported Python, ...
        raise UserError(f"torch.fx cannot trace {type(model).__name__} ({first_line(err)}): snnbench converts "
                        "models whose forward has no control flow that depends on tensor values; see "
                        "docs/models.md") from err
    return torch.fx.GraphModule(model, graph, class_name=type(model).__name__)


@dataclass
class CanonicalGraph:
    """A canonical network and what canonicalisation did to the model it came from (`snnbench inspect`)."""
    module: torch.fx.GraphModule
    layers: dict[str, str]                             # spiking layer name -> the call it came from
    folded: list[str] = field(default_factory=list)    # "bn -> conv" for each BatchNorm folded
    removed: list[str] = field(default_factory=list)   # Dropout calls, and the softmax that ends a classifier
    replaced: list[str] = field(default_factory=list)  # max poolings swapped for average pooling
    affine: list[str] = field(default_factory=list)    # BatchNorms kept as affine maps (not after a conv / linear)
    analog: dict[str, str] = field(default_factory=dict)  # analog operator -> the call it came from (compensate)


def canonicalize(model: nn.Module, maxpool: str = "error", nonlinear: str = "refuse") -> CanonicalGraph:
    """The canonical network of `model` in eval mode (a new module; `model` is not changed). `maxpool`: 'error'
    refuses max pooling, 'avg' replaces it by average pooling. Refuses, naming the node, any operation that is
    neither a ReLU-family activation nor a linear or affine map; any failure while rewriting a node is refused
    the same way."""
    name = type(model).__name__
    try:
        model = copy.deepcopy(model).eval()
    except Exception as err:
        raise UserError(f"cannot convert {name}: it cannot be copied ({first_line(err)})") from err
    # a model traced already (snnbench puts the input normalisation in front that way) keeps its graph, whose
    # nodes know the user's source lines
    gm = model if isinstance(model, torch.fx.GraphModule) else trace(model)
    in_parts = with_traceable_transformers(gm)
    if in_parts is not gm:  # attention in parts, traced again
        gm = _traced_again(in_parts)
    refusal = first_refused_node(gm, maxpool, nonlinear)
    if refusal:
        raise UserError(refusal)
    result = CanonicalGraph(gm, {})
    modules, values = dict(gm.named_modules()), value_nodes(gm.graph)
    for node in list(gm.graph.nodes):
        module = modules.get(node.target) if node.op == "call_module" else None
        with _refused_if_failing(node, module):
            _rewrite(gm, node, module, kind_of(node, module, values), modules, result)
    _name_spiking_layers(gm, result)
    if nonlinear == "compensate":  # convert.nonlinear=compensate: analog operators and their re-encoding layers
        from snnbench.core.compensate import compensate  # imports this module's naming

        compensate(gm, result)
    try:
        gm.graph.lint()
        gm.delete_all_unused_submodules()
        gm.recompile()
    except Exception as err:
        raise UserError(f"cannot convert {name}: its rewritten graph is invalid ({first_line(err)}); please "
                        "report this with the model") from err
    return result


def _rewrite(gm, node, module, kind, modules, result: CanonicalGraph):
    """Rewrite one node of the traced graph as the canonical network has it (activations: _name_spiking_layers)."""
    graph = gm.graph
    if kind != PASSES and _is_in_place(node, module):
        _later_users_read(node)
    if kind == DROPOUT:
        result.removed.append(_describe(node, module))
        node.replace_all_uses_with(node.args[0])
        graph.erase_node(node)
    elif kind == ENDING:
        result.removed.append(f"{_describe(node, module)}{_source_line(node)}, which ends the classifier (the "
                              "argmax is the same without it)")
        node.replace_all_uses_with(node.args[0])
        graph.erase_node(node)
    elif kind == AFFINE and _foldable_into(node, module, modules, gm) is not None:
        source = node.args[0]
        layer = modules[source.target]
        fuse = fuse_conv_bn_eval if isinstance(layer, nn.Conv2d) else fuse_linear_bn_eval
        _set_module(gm, source.target, fuse(layer, module))
        result.folded.append(f"{node.target} -> {source.target}")
        node.replace_all_uses_with(source)
        graph.erase_node(node)
    elif kind == AFFINE:
        if module is None and len(node.args) > 5:  # F.batch_norm: the running statistics, as in eval mode
            node.update_arg(5, False)
        elif module is None:
            node.update_kwarg("training", False)
        result.affine.append(f"{_describe(node, module)}{_source_line(node)}")
    elif kind == MAX_POOL:
        result.replaced.append(_replace_max_pool(gm, node, module))
    elif kind == LINEAR and node.op == "call_function" and node.target in WEIGHT_LAYER_FUNCTIONS:
        _as_weight_layer(gm, node)


def _as_weight_layer(gm, node):
    """F.linear / F.conv1d / F.conv2d / F.conv3d with the model's own weights -> a call of the nn.Linear / nn.Conv
    module that holds them (the same tensors), so that fan-out, MACs and the engines see the layer as they see a
    module; weights computed in the forward, or a stride / groups computed from sizes, stay a function call (a
    linear map all the same, whose synapses fan-out does not count)."""
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    options = dict(zip(names, node.args, strict=False)) | dict(node.kwargs)
    if not all(arg is None or isinstance(arg, torch.fx.Node) and arg.op == "get_attr"
               for arg in (options["weight"], options.get("bias"))):
        return
    if any(isinstance(options.get(key), torch.fx.Node) for key in names[3:]):  # e.g. groups=x.size(1)
        return

    def parameter(arg):
        if arg is None:
            return None
        tensor = operator.attrgetter(arg.target)(gm)
        return tensor if isinstance(tensor, nn.Parameter) else nn.Parameter(tensor, requires_grad=False)

    weight, bias = parameter(options["weight"]), parameter(options.get("bias"))
    if node.target is F.linear:
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    else:
        groups = options.get("groups", 1)
        layer = WEIGHT_LAYER_FUNCTIONS[node.target](
            weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]), options.get("stride", 1),
            options.get("padding", 0), options.get("dilation", 1), groups, bias=bias is not None)
    layer.weight, layer.bias = weight, bias
    name = unique_name(gm, f"{_scope(node)}{node.name}")
    gm.add_submodule(name, layer)
    _replace_by_call(gm, node, name)


def trainable_trace(model: nn.Module) -> torch.fx.GraphModule:
    """`model` traced (the same submodules and state_dict keys) so that the graph trains as the model did:
    functional dropout becomes a Dropout module, which follows train() and eval() (fx records F.dropout's
    `training` argument as the constant it was while tracing); torchvision's StochasticDepth stays a module (a
    leaf of the trace) for the same reason."""
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
    pools = [(node, module) for node, module in pools if _is_max_pool(node, module)]
    if not pools:
        return model
    for node, module in pools:
        with _refused_if_failing(node, module):
            _replace_max_pool(gm, node, module)
    gm.graph.lint()
    gm.recompile()
    return gm


def first_refused_node(gm: torch.fx.GraphModule, maxpool: str = "error", nonlinear: str = "refuse") -> str | None:
    """Why the traced `gm` cannot be converted, naming the first node that stands in the way (None: it can)."""
    modules, values = dict(gm.named_modules()), value_nodes(gm.graph)
    for node in gm.graph.nodes:
        module = modules.get(node.target) if node.op == "call_module" else None
        with _refused_if_failing(node, module):
            kind = kind_of(node, module, values)
            where = f"{_describe(node, module)}{_source_line(node)}"
            if kind == MAX_POOL and maxpool != "avg":
                return (f"the model uses max pooling ({where}), which has no exact spiking form: add "
                        "convert.maxpool=avg to replace it by average pooling")
            if kind == MAX_POOL and isinstance(why_not := _average_pool(node, module), str):
                return f"cannot replace max pooling {where} by average pooling: {why_not}"
            if kind == NONLINEAR and not (nonlinear == "compensate" and computes_analog(node, module, values)):
                return nonlinear_refusal(node, module, computes_analog(node, module, values))
    return None


def nonlinear_refusal(node: torch.fx.Node, module: nn.Module | None, analog: bool = True) -> str:
    """The refusal of a node that is neither a ReLU-family activation nor a linear or affine map (kind_of:
    NONLINEAR), the one place such a node is judged; `analog`: whether convert.nonlinear=compensate computes it
    (snnbench.core.analog)."""
    where = (f"cannot convert {_describe(node, module)}{_source_line(node)}: it is neither a ReLU-family "
             "activation (ReLU, ReLU6 / clamp at 0, leaky ReLU) nor a linear or affine map")
    if analog:
        return (f"{where}, and has no exact spiking form; add convert.nonlinear=compensate to compute it as an "
                "analog operator (docs/models.md)")
    return (f"{where}, nor an operation that convert.nonlinear=compensate computes as an analog operator (SiLU, "
            "Hardswish, GELU, sigmoid, tanh, Hardsigmoid, LayerNorm, GroupNorm, softmax, the product of two "
            "activations); replace it by one of these, and retrain")


def value_nodes(graph: torch.fx.Graph) -> set[torch.fx.Node]:
    """The nodes whose value depends on the values of the input tensors: those a spiking network must compute
    from spikes. A tensor's size, arithmetic on sizes, comparisons and assertions of sizes do not."""
    values = set()
    for node in graph.nodes:
        if node.op == "placeholder" or (node.op in ("call_function", "call_method", "call_module")
                                        and not _reads_size(node)
                                        and any(arg in values for arg in node.all_input_nodes)):
            values.add(node)
    return values


def kind_of(node: torch.fx.Node, module: nn.Module | None, values: set[torch.fx.Node]) -> str:
    """What `node` is to the conversion (PASSES, ACTIVATION, LINEAR, AFFINE, DROPOUT, MAX_POOL, ENDING or
    NONLINEAR); `values`: the graph's value_nodes."""
    if node.op in ("placeholder", "output", "get_attr") or node not in values:
        return PASSES
    if isinstance(module, DROPOUT_MODULES) or (node.op == "call_function" and node.target in DROPOUT_FUNCTIONS):
        return DROPOUT
    if _is_max_pool(node, module):
        return MAX_POOL
    if _ends_classifier(node, module):
        return ENDING
    if activation_of(node, module, values) is not None:
        return ACTIVATION
    if _is_batch_norm(node, module, values):
        return AFFINE
    if _is_linear(node, module, values):
        return LINEAR
    return NONLINEAR


def activation_of(node: torch.fx.Node, module: nn.Module | None, values=frozenset()) -> Activation | None:
    """The ReLU-family activation `node` computes (None: it is none): ReLU, clipped ReLUs (clip at 0 and a
    positive upper end) and leaky ReLUs with a constant slope."""
    if isinstance(module, nn.ReLU):
        return Activation("nn.ReLU", module.clip if isinstance(module, ClippedReLU) else None)
    if isinstance(module, nn.Hardtanh):
        return _clipped(f"nn.{type(module).__name__}", module.min_val, module.max_val)
    if isinstance(module, nn.LeakyReLU):
        return Activation("nn.LeakyReLU", slope=module.negative_slope)
    if isinstance(module, nn.PReLU):
        return Activation("nn.PReLU", slope=module.weight.detach())
    options = dict(zip(("input", "first", "second"), node.args, strict=False)) | dict(node.kwargs)
    if node.op == "call_function" and node.target in RELU_FUNCTIONS:
        return Activation(RELU_FUNCTIONS[node.target])
    if node.op == "call_method" and node.target in RELU_METHODS:
        return Activation(RELU_METHODS[node.target])
    if node.op == "call_function" and node.target in HARDTANH_FUNCTIONS:
        if node.target is F.relu6:
            return Activation("F.relu6", 6.0)
        return _clipped(HARDTANH_FUNCTIONS[node.target], options.get("min_val", options.get("first", -1.0)),
                        options.get("max_val", options.get("second", 1.0)))
    clamp = (CLAMP_FUNCTIONS.get(node.target) if node.op == "call_function" else
             f"Tensor.{node.target}" if node.op == "call_method" and node.target in CLAMP_METHODS else None)
    if clamp is not None:
        return _clipped(clamp, options.get("min", options.get("first")),
                        None if "clamp_min" in clamp else options.get("max", options.get("second")))
    if node.op == "call_function" and node.target in LEAKY_FUNCTIONS:
        if node.target in (F.prelu, torch.prelu):
            weight = options.get("weight", options.get("first"))
            constant = isinstance(weight, torch.fx.Node) and weight.op == "get_attr"
            return Activation(LEAKY_FUNCTIONS[node.target], slope=weight) if constant else None
        slope = options.get("negative_slope", options.get("first", 0.01))
        return Activation(LEAKY_FUNCTIONS[node.target], slope=slope) if _is_number(slope) else None
    return None


def _clipped(origin: str, lower, upper) -> Activation | None:
    """clip(x, lower, upper) as an activation: a ReLU, clipped at a positive upper end; None for any other."""
    if lower is None or not _is_number(lower) or lower != 0:
        return None
    if upper is None:
        return Activation(origin)
    return Activation(origin, float(upper)) if _is_number(upper) and upper > 0 else None


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _reads_size(node) -> bool:
    return (node.op == "call_method" and node.target in SIZE_METHODS
            or node.op == "call_function" and node.target is getattr and node.args[1] in SIZE_ATTRIBUTES)


def _ends_classifier(node, module) -> bool:
    """A softmax over the classes, log_softmax or sigmoid whose result is the network's output."""
    monotone = (isinstance(module, MONOTONE_ENDING_MODULES)
                or node.op == "call_function" and node.target in MONOTONE_ENDINGS
                or node.op == "call_method" and node.target in MONOTONE_ENDING_METHODS)
    if not monotone or len(node.users) != 1:
        return False
    output = next(iter(node.users))
    if output.op != "output" or output.args[0] is not node:
        return False
    dim = module.dim if isinstance(module, nn.Softmax | nn.LogSoftmax) else node.kwargs.get(
        "dim", node.args[1] if len(node.args) > 1 else None)
    return dim in (None, 1, -1)  # the classes of [batch, classes] logits


def _is_batch_norm(node, module, values) -> bool:
    """BatchNorm with running statistics, in eval mode an affine map per channel."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return module.track_running_stats and module.running_mean is not None
    if node.op != "call_function" or node.target is not F.batch_norm:
        return False
    options = dict(zip(("input", "running_mean", "running_var", "weight", "bias"), node.args, strict=False))
    options |= node.kwargs
    statistics = (options.get("running_mean"), options.get("running_var"))
    return (all(isinstance(s, torch.fx.Node) for s in statistics)
            and not any(isinstance(options.get(key), torch.fx.Node) and options[key] in values
                        for key in ("running_mean", "running_var", "weight", "bias")))


def _foldable_into(node, module, modules, gm) -> nn.Module | None:
    """The conv / linear layer a BatchNorm module folds into: it directly follows it, and nothing else reads or
    calls that layer (None: it is kept as an affine map)."""
    if not isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
        return None
    source = node.args[0]
    layer = modules.get(source.target) if source.op == "call_module" else None
    calls = sum(n.op == "call_module" and n.target == source.target for n in gm.graph.nodes)
    if not isinstance(layer, nn.Conv2d | nn.Linear) or len(source.users) > 1 or calls > 1:
        return None
    return layer


def _is_linear(node, module, values) -> bool:
    if node.op == "call_module":
        return isinstance(module, LINEAR_MODULES)

    def constant(arg):
        found = []
        torch.fx.node.map_arg(arg, found.append)
        return not any(node in values for node in found)

    if node.op == "call_function" and node.target is F.pad:
        mode = node.kwargs.get("mode", node.args[2] if len(node.args) > 2 else "constant")
        value = node.kwargs.get("value", node.args[3] if len(node.args) > 3 else None)
        return mode == "constant" and not value
    if node.op == "call_function" and node.target in WEIGHTED_FUNCTIONS:
        return all(constant(arg) for arg in (*node.args[1:], *node.kwargs.values()))
    if node.op == "call_function" and node.target in SCALINGS or (
            node.op == "call_method" and node.target in SCALING_METHODS):
        # x * c and x / c for a constant c (a number, a buffer, a parameter reshaped); x * y of two computed
        # tensors is not linear
        first, second = node.args[:2]
        return constant(second) if node.target in DIVISIONS else constant(first) or constant(second)
    if node.op == "call_function" and node.target is operator.getitem:
        return all(constant(arg) for arg in node.args[1:])  # indices that do not depend on the values
    return (node.op == "call_function" and node.target in LINEAR_FUNCTIONS
            or node.op == "call_method" and node.target in LINEAR_METHODS)


def _is_in_place(node, module) -> bool:
    if isinstance(module, nn.ReLU | nn.Hardtanh | nn.LeakyReLU) and module.inplace:
        return True
    if not node.args or not isinstance(node.args[0], torch.fx.Node):
        return False
    if node.op == "call_method":
        return node.target.endswith("_")
    return node.op == "call_function" and (node.target in IN_PLACE_FUNCTIONS or node.kwargs.get("inplace") is True)


def _later_users_read(node: torch.fx.Node):
    """An in-place call changed its input tensor: the nodes after it that read that tensor read its result."""
    source = node.args[0]
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    for user in list(source.users):
        if user is not node and order[user] > order[node]:
            user.replace_input_with(source, node)


def _is_max_pool(node, module) -> bool:
    return (node.op == "call_module" and type(module) in MAX_POOLS
            or node.op == "call_function" and node.target in MAX_POOL_FUNCTIONS)


def _average_pool(node, module) -> nn.Module | str:
    """The average pooling over the same windows as the max pooling `node` (kernel, stride, padding, ceil_mode),
    or why there is none."""
    kind = type(module) if module is not None else MAX_POOL_FUNCTIONS[node.target]
    adaptive = kind in (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)
    names = ADAPTIVE_POOL_OPTIONS if adaptive else POOL_OPTIONS
    if module is not None:
        options = {name: getattr(module, name) for name in names}
    else:
        options = dict(zip(names, node.args[1:], strict=False)) | dict(node.kwargs)
    if options.get("return_indices"):
        return "it returns the indices of its maxima, which average pooling has not"
    two_d = kind in (nn.MaxPool2d, nn.AdaptiveMaxPool2d)
    if adaptive:
        return (nn.AdaptiveAvgPool2d if two_d else nn.AdaptiveAvgPool1d)(options["output_size"])
    dilation = options.get("dilation", 1)
    if any(d != 1 for d in (dilation if isinstance(dilation, tuple | list) else (dilation,))):
        return f"its dilation {dilation} has no average-pooling form (use dilation 1)"
    kernel = options["kernel_size"]
    stride = options.get("stride") or kernel
    return (nn.AvgPool2d if two_d else nn.AvgPool1d)(kernel, stride, options.get("padding", 0),
                                                      ceil_mode=options.get("ceil_mode", False))


def _replace_max_pool(gm, node, module) -> str:
    """Max pooling -> average pooling over the same windows (convert.maxpool=avg): a module in its place, a
    functional call by a module named after it. Returns what was replaced."""
    origin = _describe(node, module)
    average = _average_pool(node, module)
    if isinstance(average, str):
        raise UserError(f"cannot replace max pooling {origin}{_source_line(node)} by average pooling: {average}")
    if module is not None:
        gm.add_submodule(node.target, average)
        return f"{origin} -> average pooling"
    name = unique_name(gm, f"{_scope(node)}avg_pool")
    gm.add_submodule(name, average)
    with gm.graph.inserting_before(node):
        node.replace_all_uses_with(gm.graph.call_module(name, (node.args[0],)))
    gm.graph.erase_node(node)
    return f"{origin} -> average pooling"


def _name_spiking_layers(gm: torch.fx.GraphModule, result: CanonicalGraph):
    """Each ReLU-family call site becomes calls of modules of its own: a module keeps its name for its first call,
    its later calls are <name>_call2, _call3, ...; a functional call is named relu (clipped_relu, leaky_relu), relu_1,
    ... within the module whose forward makes it. A ReLU is an nn.ReLU, a clipped ReLU a ClippedReLU; a leaky ReLU
    is two ReLU layers, max(x, 0) - slope * max(-x, 0): <name>_positive and <name>_negative."""
    modules, calls = dict(gm.named_modules()), {}
    values = value_nodes(gm.graph)
    for node in list(gm.graph.nodes):
        module = modules.get(node.target) if node.op == "call_module" else None
        if kind_of(node, module, values) != ACTIVATION:
            continue
        with _refused_if_failing(node, module):
            activation = activation_of(node, module, values)
            if module is not None:
                calls[node.target] = calls.get(node.target, 0) + 1
                call = calls[node.target]
                name = node.target if call == 1 else f"{node.target}_call{call}"
                origin = f"{activation.origin} {node.target}" + (f", call {call}" if call > 1 else "")
            else:
                kind = "leaky_relu" if activation.slope is not None else "clipped_relu" if activation.clip else "relu"
                name, origin = f"{_scope(node)}{kind}", activation.origin + _source_line(node)
            if activation.slope is not None:
                _split_leaky(gm, node, activation, name, origin, result)
                continue
            if isinstance(module, nn.ReLU) and call == 1:  # also a QCFS or a ClippedReLU: kept as it is
                module.inplace = False  # its in-place effect is in the graph now (_later_users_read)
                result.layers[node.target] = origin
                continue
            layer = ClippedReLU(activation.clip) if activation.clip is not None else nn.ReLU()
            if not (module is not None and call == 1):
                name = unique_name(gm, name)
            gm.add_submodule(name, layer)
            _replace_by_call(gm, node, name)
            result.layers[name] = origin


def _split_leaky(gm, node, activation: Activation, name: str, origin: str, result: CanonicalGraph):
    """max(x, 0) + slope * min(x, 0) as max(x, 0) - slope * max(-x, 0): two spiking layers (the positive and the
    negative part), summed after the negative part's constant scale."""
    graph, x = gm.graph, node.args[0]
    slope = activation.slope
    if isinstance(slope, torch.fx.Node):  # F.prelu's weight, a parameter of the model
        slope = operator.attrgetter(slope.target)(gm).detach()
    positive, negative = unique_name(gm, f"{name}_positive"), unique_name(gm, f"{name}_negative")
    gm.add_submodule(positive, nn.ReLU())
    gm.add_submodule(negative, nn.ReLU())
    scale = unique_name(gm, f"{name}_slope")
    gm.add_submodule(scale, ChannelScale(-torch.as_tensor(slope, dtype=torch.float32)))
    with graph.inserting_before(node):
        kept = graph.call_module(positive, (x,))
        dropped = graph.call_module(negative, (graph.call_function(operator.neg, (x,)),))
        total = graph.call_function(operator.add, (kept, graph.call_module(scale, (dropped,))))
    node.replace_all_uses_with(total)
    graph.erase_node(node)
    result.layers[positive] = f"{origin}, positive part"
    result.layers[negative] = f"{origin}, negative part (x slope)"


def _replace_by_call(gm, node, name: str):
    """`node` replaced by a call of the module `name` on its first argument."""
    with gm.graph.inserting_before(node):
        call = gm.graph.call_module(name, (node.args[0],))
    node.replace_all_uses_with(call)
    gm.graph.erase_node(node)


@contextlib.contextmanager
def _refused_if_failing(node, module):
    """An unexpected failure while judging or rewriting `node` becomes the one-line refusal naming it."""
    try:
        yield
    except UserError:
        raise
    except Exception as err:
        raise UserError(f"cannot convert {_describe(node, module)}{_source_line(node)}: rewriting it failed "
                        f"({type(err).__name__}: {first_line(err)}); please report this with the model") from err


def reached(starts, onward, passes) -> Iterator[torch.fx.Node]:
    """Every node reached from `starts` (each once), going on from a node to `onward(node)` (its users, or its
    inputs) only where `passes(node)` (a linear map the walk looks through)."""
    frontier, seen = list(starts), set()
    while frontier:
        node = frontier.pop()
        if node in seen:
            continue
        seen.add(node)
        yield node
        if passes(node):
            frontier.extend(onward(node))


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
    """' at file.py:12' for the user's line that made this node, when fx recorded it: not torch's own frames, nor
    snnbench's rewriting (core/: attention in parts names the user's call of the attention)."""
    frames = re.findall(r'File "([^"]+)", line (\d+)', node.stack_trace or "")
    user = [(f, line) for f, line in frames if not f.startswith(NOT_USER_CODE)]
    return f" at {Path(user[-1][0]).name}:{user[-1][1]}" if user else ""


NOT_USER_CODE = (f"{Path(torch.__file__).parent}{os.sep}", f"{Path(__file__).parent}{os.sep}")


def _traced_again(model: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """`model`, a traced graph rewritten in place (attention in parts), traced again. The new nodes were made by
    `model`'s generated code (`<eval_with_key>.N`): each gets, in place of that frame of its stack trace, the stack
    trace of the node of `model` that made it, so that refusals name the user's source lines."""
    gm = trace(model)
    code, originals = model.forward.__code__, list(model.graph.nodes)
    generated = re.compile(rf'File "{re.escape(code.co_filename)}", line (\d+)')

    def original_frames(frame: str) -> str:
        found = generated.search(frame)
        index = model._lineno_map.get(int(found[1]) - code.co_firstlineno) if found else None
        made_by = originals[index].stack_trace if index is not None else None
        return f"{made_by}\n" if made_by else frame

    for node in gm.graph.nodes:
        if node.stack_trace:
            frames = re.split(r'(?m)^(?=\s*File ")', node.stack_trace)
            node.stack_trace = "".join(original_frames(frame) for frame in frames)
    return gm


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
