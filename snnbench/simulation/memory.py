"""The memory a simulation needs, estimated before it starts and checked against what the machine has free: a
simulation that cannot fit (sim.T in the millions, say) is refused in one line instead of growing until the
machine swaps or kills it."""

import logging

import psutil
import torch
from torch import nn

from snnbench.core.spike_product import SpikeProduct
from snnbench.errors import UserError
from snnbench.simulation.backend import activation_elements, spiking_layers

log = logging.getLogger("snnbench")
# what one time step of accuracy.csv costs the host while it is tabulated and written: the row, its temporaries and
# its CSV text (measured, docs/errors.md)
TABLE_BYTES_PER_STEP = 700


def _gb(size: float) -> str:
    return f"{size / 2**30:.1f} GB"


def step_elements(snn: nn.Module, image: torch.Tensor) -> int:
    """Elements one time step of one image holds while a chunk is computed: every leaf module's output
    (activation_elements) and, for each product of spike trains, the state it computes beside its output — the
    operands' running sums before and after each step (3 x its operands) and the running products, rates and
    increments (4 x its output): attention maps, the largest tensors of a transformer's chunk."""
    extra, hooks = [0], []

    def count(module, inputs, output):
        extra[0] += 4 * output.numel() + 3 * sum(x.numel() for x in inputs)

    for module in snn.modules():
        if isinstance(module, SpikeProduct):
            hooks.append(module.register_forward_hook(count))
    try:
        return activation_elements(snn, image) + extra[0]
    finally:
        for hook in hooks:
            hook.remove()


def check_simulation_memory(snn: nn.Module, image: torch.Tensor, T: int, sub_batch: int, chunk: int, device):
    """Refuse a simulation of `snn` for T steps, `sub_batch` images x `chunk` steps at a time, whose per-step
    counters, result table and activations need more memory than is free (on the GPU and on the host)."""
    layers = len(spiking_layers(snn))
    # per spiking layer two float64 [T] counters (events, spike units) in the neuron and two in the run's totals;
    # the correct predictions, int64 [T]
    counters = T * (4 * 8 * layers + 8)
    table = T * TABLE_BYTES_PER_STEP
    # float32 inputs and outputs of every layer for one chunk, as simulate.choose_chunk counts them
    activations = 2 * 4 * step_elements(snn, image) * sub_batch * chunk
    on_gpu = torch.device(device).type == "cuda"
    needs = {"GPU": counters + activations, "host": table} if on_gpu else {"host": counters + activations + table}
    free = {"host": psutil.virtual_memory().available}
    if on_gpu:
        free["GPU"] = torch.cuda.mem_get_info(device)[0]
    parts = (f"{_gb(counters)} of per-step counters for {layers} spiking layers, {_gb(table)} for accuracy.csv, "
             f"{_gb(activations)} of activations")
    for where, need in needs.items():
        if need > free[where]:
            knob = "sim.T" if counters + table > activations else "sim.sub_batch"
            raise UserError(f"simulating sim.T={T} needs about {_gb(need)} of {where} memory ({parts}), but "
                            f"{_gb(free[where])} are free: lower {knob}")
    log.info("simulation memory: about %s (%s); %s free", " + ".join(f"{_gb(need)} {where}" for where, need in
                                                                  needs.items()),
             parts, " + ".join(f"{_gb(free[where])} {where}" for where in needs))
