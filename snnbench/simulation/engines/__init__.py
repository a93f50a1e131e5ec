"""The simulation backends, one module each (`sim.engine=<module name>`), each with a BACKEND: an instance of
snnbench.simulation.simulate.Backend. This package imports nothing heavy until a backend is asked for.

    torch      the folded PyTorch engine: stateless layers once per chunk of steps, the neurons loop over the steps
    int8       torch, with the spike-fed convs and linear layers in exact int8 arithmetic (CPU, oneDNN)
    triton     torch's layers, and each neuron layer's chunk of steps in one fused Triton kernel (CUDA)
    reference  one full network pass per step, nothing folded, nothing replaced: the oracle of the others

A new backend is one module here.
"""

import importlib
import pkgutil

from snnbench.errors import UserError


def names() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(__path__))


def get(name: str):
    """The backend called `name` (its module's BACKEND)."""
    if name not in names():
        raise UserError(f"unknown sim.engine '{name}': choose auto or one of {', '.join(names())}")
    return importlib.import_module(f"{__name__}.{name}").BACKEND
