"""`engine=triton`: the torch engine's layers, and each neuron layer's chunk of steps in one launch of a fused
Triton kernel (snnbench.simulation.triton_neuron): membranes in registers across the steps, counters reduced in
the kernel. `engine=auto` chooses it on a GPU where Triton runs."""

import importlib.util
import os
from dataclasses import dataclass

import torch

from snnbench.core.neurons import IFNeuron, SpikingGraph
from snnbench.simulation.backend import Backend, Settings, blocks_at_once, computed_once


@dataclass(frozen=True)
class Triton(Backend):
    name: str = "triton"

    def unavailable(self, device) -> str | None:
        if importlib.util.find_spec("triton") is None:
            return ("engine=triton needs Triton, which ships with PyTorch's CUDA builds: install one, or choose "
                    "engine=auto or torch")
        if torch.device(device).type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            return (f"engine=triton runs on CUDA devices (device here: {device}): set device=cuda, or "
                    "TRITON_INTERPRET=1 to run its kernel on the CPU (slowly, for testing)")
        return None

    def auto_preference(self, device) -> int | None:
        return 1 if torch.device(device).type == "cuda" else None

    def blocks_at_once(self, device, threads: int | None = None) -> int:
        """One under TRITON_INTERPRET=1: Triton's interpreter is not thread-safe (two blocks at once fail with
        InterpreterError)."""
        return 1 if os.environ.get("TRITON_INTERPRET") == "1" else blocks_at_once(device, threads)

    def module_graph(self, graph: SpikingGraph, settings: Settings):
        from snnbench.simulation.triton_neuron import TritonNeuron  # imports Triton: only when this engine runs

        replacements = computed_once(graph) if settings.coding == "direct" else {}
        for node in graph.nodes:
            # a neuron with steps of its own (method=spikezip's) is computed as the torch engine does
            neuron = graph.module(node)
            if isinstance(neuron, IFNeuron) and type(neuron)._run_steps is IFNeuron._run_steps:
                replacements[node.target] = TritonNeuron.like(neuron)
        return graph.with_modules(replacements)

