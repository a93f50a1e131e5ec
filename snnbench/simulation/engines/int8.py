"""`engine=int8`: the torch engine with the spike-fed convs and linear layers at least `min_depth` deep in exact
int8 arithmetic (oneDNN, CPU; snnbench.simulation.integer_conv): the neurons that feed only those emit their
coefficients, the poolings after such neurons sum, the flattens before integer linear layers pass maps on.
`engine=auto` chooses it on a CPU with AMX, where it is measured faster than torch."""

from dataclasses import dataclass

import torch

from snnbench.core.neurons import SpikingGraph
from snnbench.errors import UserError
from snnbench.simulation.backend import Backend, Settings, computed_once
from snnbench.simulation.integer_conv import cpu_has_amx, int8_conv_available, integer_modules

# min_depth=auto computes in integers the spike-fed convs and linear layers at least this deep (multiply-accumulates
# per output value: input channels x kernel taps), where integers are measured faster (docs/performance.md,
# "Integer layers").
INTEGER_MIN_DEPTH = 256


@dataclass(frozen=True)
class Int8(Backend):
    name: str = "int8"
    min_depth: int | str = "auto"  # the shallowest spike-fed layer in integers: auto (INTEGER_MIN_DEPTH) or a number

    def __post_init__(self):
        if self.min_depth != "auto" and (isinstance(self.min_depth, bool) or not isinstance(self.min_depth, int)
                                         or self.min_depth < 0):
            raise UserError(f"engine.min_depth must be auto or a non-negative integer (0: every spike-fed layer in "
                            f"integers), got {self.min_depth!r}")

    @property
    def integer_min_depth(self) -> int:
        return INTEGER_MIN_DEPTH if self.min_depth == "auto" else self.min_depth

    def unavailable(self, device) -> str | None:
        if torch.device(device).type != "cpu" or not int8_conv_available():
            return (f"engine=int8 needs device=cpu and a PyTorch with oneDNN's int8 convolution (device here: "
                    f"{device}): choose engine=auto or torch")
        return None

    def auto_preference(self, device) -> int | None:
        return 1 if torch.device(device).type == "cpu" and cpu_has_amx() else None

    def describe(self) -> str:
        return f"{self.name} engine (integer layers of depth >= {self.integer_min_depth})"

    def module_graph(self, graph: SpikingGraph, settings: Settings):
        replacements = integer_modules(graph, self.integer_min_depth)
        if settings.coding == "direct":
            replacements.update(computed_once(graph))  # the layers before the first neurons: none is spike-fed
        return graph.with_modules(replacements)
