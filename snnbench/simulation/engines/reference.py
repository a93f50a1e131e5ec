"""`sim.engine=reference`: the test oracle. One full pass of the network as it is per time step, nothing folded,
nothing computed once, nothing replaced (the same blocks of images as the other engines, so that Poisson coding
draws the same spikes)."""

from dataclasses import replace

from snnbench.core.neurons import SpikingGraph
from snnbench.simulation.backend import Backend, Settings, Simulation


class Reference(Backend):
    name = "reference"

    def prepare(self, network, settings: Settings) -> Simulation:
        return super().prepare(network, replace(settings, chunk=1))

    def module_graph(self, graph: SpikingGraph, settings: Settings):
        return graph.with_modules({})


BACKEND = Reference()
