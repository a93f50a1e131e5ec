"""Analog operators (convert.nonlinear=compensate): the operations that are neither ReLU-family activations nor
linear maps — SiLU, Hardswish, GELU, sigmoid, tanh, Hardsigmoid, LayerNorm, GroupNorm, softmax inside the network,
the elementwise product of two computed tensors — computed on the running mean of their inputs with expectation
compensation (Huang et al., "Towards High-performance Spiking Transformers from ANN to SNN Conversion", ACM MM
2024): at step t an operator f emits t·f(m_t) − (t−1)·f(m_{t−1}), m_t the mean of its inputs over steps 1..t, so
that its output summed up to t is t·f(m_t), the ANN's value of the mean input, as a rate.

In the canonical network an operator is an `Analog` module (it computes f, as the ANN does); the spiking network
calls an `AnalogOperator` in its place, which keeps the running sums across the steps of a batch, as a neuron
keeps its membrane; a matrix product of two spike trains (attention) is a SpikeProduct there instead, driven by
the operands' events (spike_products). Where an operator's output feeds a weight layer or a product, a `Reencode`
layer (a spiking layer, calibrated like every other) turns it into signed spikes, so that weight layers stay
event-driven."""

import operator

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from snnbench.core.neurons import IFNeuron
from snnbench.core.spike_product import SpikeProduct
from snnbench.core.stepped import Stepped

NONLINEAR_MODULES = (nn.SiLU, nn.Hardswish, nn.GELU, nn.Sigmoid, nn.Tanh, nn.Hardsigmoid, nn.LayerNorm,
                     nn.GroupNorm, nn.Softmax, nn.LogSoftmax)
NONLINEAR_FUNCTIONS = {F.silu, F.hardswish, F.gelu, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.hardsigmoid,
                       F.layer_norm, F.group_norm, F.softmax, torch.softmax, F.log_softmax, torch.log_softmax}
NONLINEAR_METHODS = {"sigmoid", "tanh", "softmax", "log_softmax"}
PRODUCT_FUNCTIONS = {operator.mul, torch.mul, operator.matmul, torch.matmul, torch.bmm}
PRODUCT_METHODS = {"mul", "matmul", "bmm"}
# products over the last two dimensions (attention's Q·Kᵀ and attention·V), as functions and Tensor methods
MATRIX_PRODUCTS = {operator.matmul, torch.matmul, torch.bmm, "matmul", "bmm"}
# rearrangements that keep a spike train one (each entry a spike count, moved): between a spiking layer and a product
REARRANGING_METHODS = {"view", "reshape", "transpose", "permute", "flatten", "unflatten", "contiguous", "t"}
REARRANGING_FUNCTIONS = {torch.transpose, torch.permute, torch.reshape, torch.flatten, torch.t}


def is_product(node: torch.fx.Node, values: set[torch.fx.Node]) -> bool:
    """A product of two tensors whose values depend on the input (`values`: the graph's nodes that do,
    snnbench.core.graph.value_nodes): elementwise (a gate) or of matrices (attention); x * constant is linear."""
    multiplies = (node.op == "call_function" and node.target in PRODUCT_FUNCTIONS
                  or node.op == "call_method" and node.target in PRODUCT_METHODS)
    return multiplies and all(arg in values for arg in node.args[:2])


def computes_analog(node: torch.fx.Node, module: nn.Module | None, values: set[torch.fx.Node]) -> bool:
    """Whether convert.nonlinear=compensate computes this node as an analog operator."""
    if node.op == "call_module":
        return isinstance(module, NONLINEAR_MODULES)
    return (node.op == "call_function" and node.target in NONLINEAR_FUNCTIONS
            or node.op == "call_method" and node.target in NONLINEAR_METHODS or is_product(node, values))


class Slot:
    """Where the `index`-th tensor input of an analog operator goes among the arguments of its function."""

    def __init__(self, index: int):
        self.index = index


class Analog(nn.Module):
    """An analog operator of a canonical network, computing its function as the ANN does: `function` (a module, a
    function or a Tensor method's name) called with `args` and `kwargs`, where each Slot takes the tensor passed in
    its place. `running[i]`: whether input i depends on the network's input (its running mean is taken in the
    spiking network) rather than being a constant (a parameter)."""

    def __init__(self, function, args: tuple, kwargs: dict, running: tuple[bool, ...], product: bool):
        super().__init__()
        self.function, self.args, self.kwargs = function, args, kwargs
        self.running, self.product = running, product

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        def fill(arg):
            return inputs[arg.index] if isinstance(arg, Slot) else arg
        args = [fill(arg) for arg in self.args]
        kwargs = {key: fill(value) for key, value in self.kwargs.items()}
        if isinstance(self.function, str):
            return getattr(args[0], self.function)(*args[1:], **kwargs)
        return self.function(*args, **kwargs)

    def extra_repr(self) -> str:
        return self.function if isinstance(self.function, str) else getattr(self.function, "__name__", "")


class AnalogOperator(Stepped):
    """`analog` in the spiking network: keeps the running sum of each input since the batch began and emits at step
    t t·f(mean up to t) − (t−1)·f(mean up to t−1). Like a neuron, it takes a chunk of `steps` steps folded into the
    batch dimension ([steps x batch, ...]), or one input current constant over the chunk ([batch, ...])."""

    def __init__(self, analog: Analog):
        super().__init__()
        self.analog = analog
        self.begin(total_steps=0)

    @classmethod
    def like(cls, module: "AnalogOperator") -> "AnalogOperator":
        return cls(module.analog)

    def begin(self, total_steps: int):
        self.t = 0
        self.sums = None     # per running input, its sum over the steps so far [batch, ...]
        self.summed = None   # t·f(mean input up to t) at the last step: the output summed so far [1, batch, ...]

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        steps = self.steps
        running = [number for number, is_running in enumerate(self.analog.running) if is_running]
        sums = [self._running_sums(self.per_step(inputs[number], number), k) for k, number in enumerate(running)]
        self.sums = [total[-1] for total in sums]
        t = torch.arange(self.t + 1, self.t + steps + 1, dtype=sums[0].dtype, device=sums[0].device)
        arguments = list(inputs)  # the constants as they are, each running input as its means up to each step
        for number, total in zip(running, sums, strict=True):
            arguments[number] = (total / _along_steps(t, total.dim())).flatten(0, 1)
        value = self.analog(*arguments)
        cumulative = value.unflatten(0, (steps, -1)) * _along_steps(t, value.dim() + 1)
        earlier = self.summed if self.summed is not None else torch.zeros_like(cumulative[:1])
        self.summed = cumulative[-1:].clone()
        self.t += steps
        return torch.diff(cumulative, dim=0, prepend=earlier).flatten(0, 1)

    def _running_sums(self, x: torch.Tensor, number: int) -> torch.Tensor:
        """The sums of running input `number` up to each step of the chunk [steps, batch, ...], added one step at a
        time, so that a chunk of any length gives the same sums as single steps (bit for bit)."""
        total = self.sums[number] if self.sums is not None else torch.zeros_like(x[0])
        sums = torch.empty_like(x)
        for step in range(len(x)):
            total = torch.add(total, x[step], out=sums[step])
        return sums


def _along_steps(t: torch.Tensor, dims: int) -> torch.Tensor:
    """The step numbers `t` [steps] shaped to broadcast over a [steps, batch, ...] tensor of `dims` dimensions."""
    return t.view(-1, *[1] * (dims - 1))


class Reencode(nn.ReLU):
    """A spiking layer that re-encodes an analog operator's output into spikes, so that the weight layers or the
    product it feeds are driven by events. In the canonical network it passes its input on (the ANN's value, which
    calibration reads); like every spiking layer of a canonical network it is a ReLU module, so that calibration
    and the methods find it. Its neuron is signed (`neuron`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    @staticmethod
    def neuron(threshold: torch.Tensor, v0: float = 0.0, c_max: int | None = 1, **method_knobs) -> IFNeuron:
        """The signed IF neuron of a re-encoding layer, with the method's initial potential `v0` and `c_max` (its
        other knobs concern ReLU layers): a positive spike (coefficient) when the membrane reaches the threshold θ,
        a negative one when it falls to (2·v0 − 1)·θ, as far below its start v0·θ as the positive threshold is
        above it, reset by subtraction. So the summed output is the summed input rounded to a multiple of θ as
        the method rounds positive inputs, symmetrically: truncated towards 0 with v0 = 0, rounded with v0 = 0.5.
        `threshold`: the calibrated magnitude of its input."""
        return ReencodingNeuron(threshold, v0=v0, c_max=c_max, neg_threshold=1.0 - 2.0 * v0,
                                require_positive_net=False)


class ReencodingNeuron(IFNeuron):
    """The signed IF neuron of a Reencode layer: an IFNeuron, typed apart so that layers.csv and inspect can say
    which spiking layers re-encode analog values."""


def signed_layers(model: nn.Module) -> set[str]:
    """The spiking layers of a canonical network whose values have both signs (calibrated on their magnitude)."""
    return {name for name, module in model.named_modules() if isinstance(module, Reencode)}


def spike_products(model: torch.fx.GraphModule) -> set[str]:
    """The matrix products among the analog operators of a canonical network (or of its spiking network) whose
    two operands are spike trains: outputs of spiking layers, directly or rearranged (view, transpose, ...). The
    spiking network computes them as SpikeProducts, driven by the operands' events; every other product is an
    analog operator."""
    modules = dict(model.named_modules())
    found = set()
    for node in model.graph.nodes:
        analog = modules.get(node.target) if node.op == "call_module" else None
        if (isinstance(analog, Analog) and analog.function in MATRIX_PRODUCTS and len(node.args) == 2
                and not analog.kwargs and all(_is_spike_train(arg, modules) for arg in node.args)):
            found.add(node.target)
    return found


def _is_spike_train(node: torch.fx.Node, modules: dict) -> bool:
    while (node.op == "call_method" and node.target in REARRANGING_METHODS
           or node.op == "call_function" and node.target in REARRANGING_FUNCTIONS):
        node = node.args[0]
    return node.op == "call_module" and isinstance(modules[node.target], nn.ReLU | IFNeuron)


def analog_operators(model: torch.fx.GraphModule) -> dict[str, AnalogOperator | SpikeProduct]:
    """What the spiking network calls in place of each analog operator of a canonical network, by name: a
    SpikeProduct for a product of two spike trains (spike_products), else an AnalogOperator."""
    analog = {name: module for name, module in model.named_modules() if isinstance(module, Analog)}
    products = spike_products(model) if analog else set()  # a network without any may be no GraphModule
    return {name: SpikeProduct() if name in products else AnalogOperator(module) for name, module in analog.items()}


SPIKING, REENCODING, ANALOG = "spiking", "spiking (re-encodes analog)", "analog"
SPIKE_PRODUCT = "product of spike trains"


def layer_kind(module: nn.Module) -> str:
    """What a layer of a spiking network is, for layers.csv's `kind`: a spiking neuron (one re-encoding an analog
    operator's output, or any other), a product of two spike trains or an analog operator."""
    if isinstance(module, AnalogOperator):
        return ANALOG
    if isinstance(module, SpikeProduct):
        return SPIKE_PRODUCT
    return REENCODING if isinstance(module, ReencodingNeuron) else SPIKING


@torch.inference_mode()
def analog_values(ann: torch.fx.GraphModule, sample: torch.Tensor) -> dict[str, int]:
    """The multiply-accumulates per image and time step of each analog operator of a canonical network, measured
    with forward hooks: one per value it outputs, a matrix product's inner dimension per value. The products of
    two spike trains (spike_products) are left out: the simulation counts their work from events."""
    values, hooks, products = {}, [], spike_products(ann)

    def record(module, inputs, output, name):
        inner = inputs[0].shape[-1] if module.function in MATRIX_PRODUCTS else 1
        values[name] = output[0].numel() * inner

    for name, module in ann.named_modules():
        if isinstance(module, Analog) and name not in products:
            hooks.append(module.register_forward_hook(
                lambda module, inputs, output, name=name: record(module, inputs, output, name)))
    try:
        ann.eval()(sample[:1].to(next(ann.parameters()).device))
    finally:
        for hook in hooks:
            hook.remove()
    return values
