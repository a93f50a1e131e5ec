"""`engine=torch`: the folded PyTorch engine. Stateless layers run once per chunk of steps folded into the batch,
the network's IF neurons loop over the steps; with direct coding the layers before the first neurons run once per
block of images. `engine=auto` takes it wherever no faster engine runs."""

from dataclasses import dataclass

from snnbench.core.neurons import SpikingGraph
from snnbench.simulation.backend import Backend, Settings, computed_once


@dataclass(frozen=True)
class Torch(Backend):
    name: str = "torch"

    def auto_preference(self, device) -> int | None:
        return 0

    def module_graph(self, graph: SpikingGraph, settings: Settings):
        return graph.with_modules(computed_once(graph) if settings.coding == "direct" else {})
