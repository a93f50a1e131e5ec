"""`sim.engine=int8`: the torch engine with the spike-fed convs and linear layers at least `integer_min_depth` deep
in exact int8 arithmetic (oneDNN, CPU; snnbench.simulation.integer_conv): the neurons that feed only those emit their
coefficients, the poolings after such neurons sum, the flattens before integer linear layers pass maps on."""

import torch

from snnbench.core.neurons import SpikingGraph
from snnbench.simulation.backend import Backend, Settings, computed_once
from snnbench.simulation.integer_conv import int8_conv_available, integer_modules


class Int8(Backend):
    name = "int8"

    def unavailable(self, device) -> str | None:
        if torch.device(device).type != "cpu" or not int8_conv_available():
            return (f"sim.engine=int8 needs device=cpu and a PyTorch with oneDNN's int8 convolution (device here: "
                    f"{device}): choose sim.engine=auto or torch")
        return None

    def module_graph(self, graph: SpikingGraph, settings: Settings):
        replacements = integer_modules(graph, settings.integer_min_depth)
        if settings.coding == "direct":
            replacements.update(computed_once(graph))  # the layers before the first neurons: none is spike-fed
        return graph.with_modules(replacements)


BACKEND = Int8()
