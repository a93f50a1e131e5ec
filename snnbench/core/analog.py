"""Analog operators (convert.nonlinear=compensate): the operations that are neither ReLU-family activations nor
linear maps — SiLU, Hardswish, GELU, sigmoid, tanh, Hardsigmoid, LayerNorm, GroupNorm, softmax inside the network,
the elementwise product of two computed tensors — computed on the running mean of their inputs with expectation
compensation (Huang et al., "Towards High-performance Spiking Transformers from ANN to SNN Conversion", ACM MM
2024): at step t an operator f emits t·f(m_t) − (t−1)·f(m_{t−1}), m_t the mean of its inputs over steps 1..t, so
that its output summed up to t is t·f(m_t), the ANN's value of the mean input, as a rate.

In the canonical network an operator is an `Analog` module (it computes f, as the ANN does); the spiking network
calls an `AnalogOperator` in its place, which keeps the running sums across the steps of a batch, as a neuron
keeps its membrane. Where an operator's output feeds a weight layer or a product, a `Reencode` layer (a spiking
layer, calibrated like every other) turns it into signed spikes, so that weight layers stay event-driven."""

import operator

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from snnbench.core.neurons import IFNeuron
from snnbench.core.stepped import Stepped

NONLINEAR_MODULES = (nn.SiLU, nn.Hardswish, nn.GELU, nn.Sigmoid, nn.Tanh, nn.Hardsigmoid, nn.LayerNorm,
                     nn.GroupNorm, nn.Softmax, nn.LogSoftmax)
NONLINEAR_FUNCTIONS = {F.silu, F.hardswish, F.gelu, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.hardsigmoid,
                       F.layer_norm, F.group_norm, F.softmax, torch.softmax, F.log_softmax, torch.log_softmax}
NONLINEAR_METHODS = {"sigmoid", "tanh", "softmax", "log_softmax"}
PRODUCT_FUNCTIONS = {operator.mul, torch.mul}
PRODUCT_METHODS = {"mul"}


def is_product(node: torch.fx.Node, values: set[torch.fx.Node]) -> bool:
    """An elementwise product of two tensors whose values depend on the input (`values`: the graph's nodes that
    do, snnbench.core.graph.value_nodes), e.g. a gate; x * constant is linear."""
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
        self.steps = 1
        self.reset(batch=0, total_steps=0)

    @classmethod
    def like(cls, module: "AnalogOperator") -> "AnalogOperator":
        return cls(module.analog)

    def reset(self, batch: int, total_steps: int):
        self.batch = batch
        self.t = 0
        self.sums = None     # per running input, its sum over the steps so far [batch, ...]
        self.summed = None   # t·f(mean input up to t) at the last step: the output summed so far [1, batch, ...]

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        steps, batch = self.steps, self.batch
        running = [number for number, is_running in enumerate(self.analog.running) if is_running]
        sums = [self._running_sums(self._per_step(inputs[number]), k) for k, number in enumerate(running)]
        self.sums = [total[-1] for total in sums]
        t = torch.arange(self.t + 1, self.t + steps + 1, dtype=sums[0].dtype, device=sums[0].device)
        arguments = list(inputs)  # the constants as they are, each running input as its means up to each step
        for number, total in zip(running, sums, strict=True):
            arguments[number] = (total / _along_steps(t, total.dim())).flatten(0, 1)
        value = self.analog(*arguments)
        cumulative = value.view(steps, batch, *value.shape[1:]) * _along_steps(t, value.dim() + 1)
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

    def _per_step(self, x: torch.Tensor) -> torch.Tensor:
        """A chunk's input as [steps, batch, ...]; an input current constant over the chunk repeated."""
        steps, batch = self.steps, self.batch
        if steps > 1 and x.shape[0] == batch:
            return x.unsqueeze(0).expand(steps, *x.shape)
        return x.view(steps, batch, *x.shape[1:])


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
    def neuron(threshold: torch.Tensor, c_max: int | None = 1, **method_knobs) -> IFNeuron:
        """The signed IF neuron of a re-encoding layer: a positive spike (coefficient) when the membrane reaches
        +threshold, a negative one when it falls to −threshold, reset by subtraction from 0 (the method's other
        knobs concern ReLU layers), so its summed output is its summed input truncated to a multiple of the
        threshold. `threshold`: the calibrated magnitude of its input."""
        return ReencodingNeuron(threshold, v0=0.0, c_max=c_max, neg_threshold=1.0, require_positive_net=False)


class ReencodingNeuron(IFNeuron):
    """The signed IF neuron of a Reencode layer: an IFNeuron, typed apart so that layers.csv and inspect can say
    which spiking layers re-encode analog values."""


def signed_layers(model: nn.Module) -> set[str]:
    """The spiking layers of a canonical network whose values have both signs (calibrated on their magnitude)."""
    return {name for name, module in model.named_modules() if isinstance(module, Reencode)}


def analog_operators(model: nn.Module) -> dict[str, AnalogOperator]:
    """An AnalogOperator for each analog operator of a canonical network, by name: what the spiking network calls
    in its place."""
    return {name: AnalogOperator(module) for name, module in model.named_modules() if isinstance(module, Analog)}


SPIKING, REENCODING, ANALOG = "spiking", "spiking (re-encodes analog)", "analog"


def layer_kind(module: nn.Module) -> str:
    """What a layer of a spiking network is, for layers.csv's `kind`: a spiking neuron (one re-encoding an analog
    operator's output, or any other) or an analog operator."""
    if isinstance(module, AnalogOperator):
        return ANALOG
    return REENCODING if isinstance(module, ReencodingNeuron) else SPIKING


@torch.inference_mode()
def analog_values(ann: nn.Module, sample: torch.Tensor) -> dict[str, int]:
    """Values each analog operator of a canonical network outputs per image, measured with forward hooks: what it
    computes at every time step (one multiply-accumulate each, counted as MACs)."""
    values, hooks = {}, []
    for name, module in ann.named_modules():
        if isinstance(module, Analog):
            hooks.append(module.register_forward_hook(
                lambda module, inputs, output, name=name: values.__setitem__(name, output[0].numel())))
    try:
        ann.eval()(sample[:1].to(next(ann.parameters()).device))
    finally:
        for hook in hooks:
            hook.remove()
    return values
