"""`engine=reference`: the test oracle. One full pass of the network as it is per time step, nothing folded,
nothing computed once, nothing replaced (the same blocks of images as the other engines, so that Poisson coding
draws the same spikes). `engine=auto` never chooses it."""

from dataclasses import dataclass

from snnbench.core.neurons import SpikingGraph
from snnbench.simulation.backend import Backend, Settings


@dataclass(frozen=True)
class Reference(Backend):
    name: str = "reference"

    def chunk(self, steps: int) -> int:
        return 1

    def module_graph(self, graph: SpikingGraph, settings: Settings):
        return graph.with_modules({})
