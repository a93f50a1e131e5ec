"""The spiking neuron family: one integrate-and-fire update rule, configured by knobs.

    binary IF (baseline)       c_max=1,    neg_threshold=None
    ternary (TerMapping)       c_max=1,    neg_threshold=1.0
    augmented (AugMapping)     c_max=None, neg_threshold=1.0

Each step a neuron emits one coefficient c (0 = silent) carrying c * threshold downstream, and subtracts
what it emitted from its membrane (reset by subtraction). A neuron whose consumers all fold the threshold into
their weights (the int8 engine's integer layers) emits c itself. The simulation engine folds several
time steps into the batch dimension; only the neurons loop over them (here in PyTorch operations; a subclass may
run a chunk of steps its own way, as snnbench.simulation.triton_neuron does in one kernel).
"""

import math
from dataclasses import dataclass, fields, replace
from typing import Self

import torch
import torch.fx
from torch import nn

from snnbench.core.stepped import Stepped, broadcast_over_sample


@dataclass(frozen=True, eq=False)
class NeuronSpec:
    """What an IF neuron is, fixed when it is built: its parameters (tensors: a scalar, one value per channel, or
    one per neuron shaped like one sample) and its knobs. A method that tunes or corrects neurons builds new ones
    from changed specs (dataclasses.replace, IFNeuron.built); it never changes a neuron's buffers. The state of a
    simulation (membrane, counters) is the neuron's own, not part of its spec."""
    threshold: torch.Tensor                 # positive
    v0: torch.Tensor | float = 0.0          # initial membrane potential, in units of the threshold
    c_max: int | None = 1                   # the most spikes a step (None: unbounded)
    neg_threshold: float | None = None      # a negative spike at v <= -neg_threshold x threshold (None: none)
    require_positive_net: bool = True       # a negative spike only while the net count is positive
    emits_coefficients: bool = False        # emits c instead of c x threshold (its consumers fold the threshold)
    bias: torch.Tensor | None = None        # a current added every step (TTRBR's mean correction, Li et al.'s shift)

    def __post_init__(self):
        # tensors of float32 (the same tensors where they are already: a neuron's spec shares its buffers)
        threshold = torch.as_tensor(self.threshold, dtype=torch.float32)
        if not bool((threshold > 0).all()):
            raise ValueError("neuron thresholds must be positive")
        object.__setattr__(self, "threshold", threshold)
        object.__setattr__(self, "v0", torch.as_tensor(self.v0, dtype=torch.float32))
        if self.bias is not None:
            object.__setattr__(self, "bias", torch.as_tensor(self.bias, dtype=torch.float32))


SPEC_FIELDS = frozenset(field.name for field in fields(NeuronSpec))


class IFNeuron(Stepped):
    def __init__(
        self,
        threshold: torch.Tensor,
        v0: float | torch.Tensor = 0.0,
        c_max: int | None = 1,
        neg_threshold: float | None = None,
        require_positive_net: bool = True,
        emits_coefficients: bool = False,
        bias: torch.Tensor | None = None,
    ):
        """The neuron of NeuronSpec(threshold, v0, ...), whose fields these are."""
        super().__init__()
        spec = NeuronSpec(threshold, v0, c_max, neg_threshold, require_positive_net, emits_coefficients, bias)
        self.register_buffer("threshold", spec.threshold)
        self.register_buffer("v0", spec.v0)
        self.register_buffer("bias", spec.bias)
        self.c_max = spec.c_max
        self.neg_threshold = spec.neg_threshold
        self.require_positive_net = spec.require_positive_net
        self.emits_coefficients = spec.emits_coefficients
        self.begin(total_steps=0)

    def __setattr__(self, name: str, value):
        if name in SPEC_FIELDS and hasattr(self, name):
            raise AttributeError(f"a neuron's {name} is fixed when it is built: build another from "
                                 f"dataclasses.replace(neuron.spec, {name}=...) with {type(self).__name__}.built")
        super().__setattr__(name, value)

    @classmethod
    def built(cls, spec: NeuronSpec) -> Self:
        """A neuron of this class as `spec` says (its tensors become the neuron's buffers, not copied)."""
        return cls(**{name: getattr(spec, name) for name in SPEC_FIELDS})

    @property
    def spec(self) -> NeuronSpec:
        """This neuron's spec, on its buffers (the same tensors, on the neuron's device)."""
        return NeuronSpec(self.threshold, self.v0, self.c_max, self.neg_threshold, self.require_positive_net,
                          self.emits_coefficients, self.bias)

    @classmethod
    def like(cls, neuron: "IFNeuron", emits_coefficients: bool | None = None) -> Self:
        """A neuron of this class with `neuron`'s spec (the same tensors) and a state of its own, emitting its
        coefficients if `emits_coefficients` (None: as `neuron` does)."""
        spec = neuron.spec
        return cls.built(spec if emits_coefficients is None else replace(spec, emits_coefficients=emits_coefficients))

    def begin(self, total_steps: int):
        """Start a new sample batch: clear the membrane (made at the first chunk, shaped like one step of its input)
        and the per-step counters, which stay on the neuron's device (no copy to the host per chunk)."""
        self.t = 0
        self.v = None
        self.net = None
        self.scratch = None
        # per step: spike units (sum of |c|) and events (non-zero c)
        self.counts = torch.zeros(2, total_steps, dtype=torch.float64, device=self.threshold.device)
        self.units, self.events = self.counts

    def extra_repr(self):
        def show(value):
            return "per-channel" if value.dim() else f"{value.item():.4g}"
        return (f"threshold={show(self.threshold)}, v0={show(self.v0)}, c_max={self.c_max}, "
                f"neg_threshold={self.neg_threshold}, "
                f"require_positive_net={self.require_positive_net}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        steps = self.steps
        constant = 0 in self.constant_inputs
        rows = x.shape[0] if constant else x.shape[0] // steps  # one step's samples (images, or windows of them)
        theta = broadcast_over_sample(self.threshold, x.dim() - 1)
        layout = _layout(x)
        if self.v is None:
            v0 = broadcast_over_sample(self.v0, x.dim() - 1) * theta
            self.v = v0.expand(rows, *x.shape[1:]).clone(memory_format=layout)
            self.net = torch.zeros_like(self.v) if self.neg_threshold is not None else None
        # the emitted values, written in place
        out = torch.empty((steps * rows, *x.shape[1:]), dtype=x.dtype, device=x.device, memory_format=layout)
        self.counts[:, self.t:self.t + steps] += self._run_steps(x, constant, theta, out)
        self.t += steps
        return out

    def _run_steps(self, x: torch.Tensor, constant: bool, theta: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Integrate this chunk's input `x` ([steps x batch, ...], or one constant current [batch, ...]) step by
        step, firing into `out` [steps x batch, ...]; return the spike units and events of each step [2, steps]."""
        steps, rows = self.steps, len(self.v)
        currents = x if constant else x.view(steps, rows, *x.shape[1:])
        if self.bias is not None:
            currents = currents + broadcast_over_sample(self.bias, x.dim() - 1)
        if self.scratch is None:
            # this step's coefficients (or their magnitudes, when the neuron emits them) and negative events:
            # reused by every step (no allocation, stays in cache)
            negative = self.neg_threshold is not None
            self.scratch = torch.empty_like(self.v), (torch.empty_like(self.v) if negative else None)
        out = out.view(steps, rows, *x.shape[1:])
        # per step and row, the spike units and events
        counts = torch.empty((2, steps, rows), dtype=x.dtype, device=x.device)
        scratch, undo = self.scratch
        for step in range(steps):
            self.v.add_(currents if constant else currents[step])
            c, emitted = (out[step], None) if self.emits_coefficients else (scratch, out[step])
            self._fire(theta, c, emitted, undo)
            self._count(c, scratch, counts[:, step])
        return counts.double().sum(2)

    def _fire(self, theta: torch.Tensor, c: torch.Tensor, out: torch.Tensor | None, undo: torch.Tensor | None):
        """Write this step's coefficients into `c`, c * theta into `out` (None: c is what is emitted), and update
        the membrane.
        With c_max = 1 the clamped floor quotients are 0 or 1: exactly the comparisons v >= theta and
        v <= -neg_threshold * theta (theta > 0), which cost a tenth of a floor division."""
        v = self.v
        if self.c_max == 1:
            torch.ge(v, theta, out=c)
        else:
            torch.div(v, theta, rounding_mode="floor", out=c).clamp_(min=0, max=self.c_max)
        if self.neg_threshold is not None:
            # negative event: undo earlier over-firing, at least one spike, at most the net count so far
            level = -self.neg_threshold * theta
            if self.c_max == 1:
                torch.le(v, level, out=undo)
            else:
                torch.div(torch.neg(v, out=undo), theta, rounding_mode="floor", out=undo).clamp_(min=1, max=self.c_max)
                undo.mul_(v <= level)
            if self.require_positive_net:
                torch.minimum(undo, self.net, out=undo)
            c.sub_(undo)
            self.net.add_(c)
        if out is None:
            v.addcmul_(c, theta, value=-1)
        else:
            torch.mul(c, theta, out=out)
            v.sub_(out)

    def _count(self, c: torch.Tensor, scratch: torch.Tensor, counts: torch.Tensor):
        """This step's coefficients c [batch, ...] -> counts [2, batch]: per image, spike units (sum of |c|) and
        events (non-zero c), exact integers in float32, with `scratch` (shaped like c; may be c itself, never the
        emitted output) to write into. Without negative events c >= 0; with c_max = 1 every event is one spike
        unit."""
        c, scratch = _per_image(c), _per_image(scratch)
        magnitude = c if self.neg_threshold is None else torch.abs(c, out=scratch)
        torch.sum(magnitude, 1, out=counts[0])
        if self.c_max == 1:
            counts[1] = counts[0]
        else:
            torch.sum(torch.clamp(magnitude, max=1, out=scratch), 1, out=counts[1])


def capped_at_clip(threshold: torch.Tensor, c_max: int | None, clip: float) -> tuple[torch.Tensor, int]:
    """The threshold and the most spikes a step of the neurons of a clipped ReLU layer (ReLU6, clamp(x, 0, clip)):
    the threshold at most the clip, and c_max at most clip / threshold, so that the most a neuron emits a step,
    c_max x threshold, and with it its rate never exceed the clip (a binary neuron of threshold clip saturates
    exactly there)."""
    threshold = torch.clamp(torch.as_tensor(threshold, dtype=torch.float32), max=clip)
    most = max(1, math.floor(clip / float(threshold.max())))
    return threshold, most if c_max is None else min(c_max, most)


class _NeuronTracer(torch.fx.Tracer):
    def is_leaf_module(self, module: nn.Module, name: str) -> bool:
        return isinstance(module, IFNeuron) or not any(isinstance(m, IFNeuron) for m in module.modules())


class SpikingGraph:
    """The graph of a spiking network down to its neurons and the modules that hold no neurons, each one opaque
    module call."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.graph = _NeuronTracer().trace(model)
        self.nodes = list(self.graph.nodes)
        self.modules = dict(model.named_modules())

    def module(self, node) -> nn.Module | None:
        """The module a node calls (None for any other node, or anything that is not a node)."""
        return self.modules[node.target] if isinstance(node, torch.fx.Node) and node.op == "call_module" else None

    def with_modules(self, replacements: dict[str, nn.Module]) -> torch.fx.GraphModule:
        """A new module that computes this graph, calling `replacements[name]` where the network calls its module
        `name`, and the network's own modules (shared, not copied) everywhere else; the network is not changed."""
        module = torch.fx.GraphModule(self.model, self.graph)
        for name, replacement in replacements.items():
            module.add_submodule(name, replacement)  # into the new module's own containers
        return module


def _per_image(x: torch.Tensor) -> torch.Tensor:
    """`x` [batch, ...] as rows [batch, n] in memory order, whatever the layout: a view, never a copy."""
    return (x.permute(0, 2, 3, 1) if _layout(x) == torch.channels_last else x).reshape(len(x), -1)


def _layout(x: torch.Tensor) -> torch.memory_format:
    """The memory format of `x`: the neuron keeps its state and output in the layout the layers give it."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format
