"""`sim.engine=triton`: the torch engine's layers, and each neuron layer's chunk of steps in one launch of a fused
Triton kernel (snnbench.simulation.triton_neuron): membranes in registers across the steps, counters reduced in
the kernel."""

import importlib.util
import os

import torch

from snnbench.core.neurons import IFNeuron, SpikingGraph
from snnbench.simulation.backend import Backend, Settings, computed_once


class Triton(Backend):
    name = "triton"

    def unavailable(self, device) -> str | None:
        if importlib.util.find_spec("triton") is None:
            return ("sim.engine=triton needs Triton, which ships with PyTorch's CUDA builds: install one, or choose "
                    "sim.engine=auto or torch")
        if torch.device(device).type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            return (f"sim.engine=triton runs on CUDA devices (device here: {device}): set device=cuda, or "
                    "TRITON_INTERPRET=1 to run its kernel on the CPU (slowly, for testing)")
        return None

    def module_graph(self, graph: SpikingGraph, settings: Settings):
        from snnbench.simulation.triton_neuron import TritonNeuron  # imports Triton: only when this engine runs

        replacements = computed_once(graph) if settings.coding == "direct" else {}
        for node in graph.nodes:
            if isinstance(neuron := graph.module(node), IFNeuron):
                replacements[node.target] = TritonNeuron.like(neuron)
        return graph.with_modules(replacements)


BACKEND = Triton()
