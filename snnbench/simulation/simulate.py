"""The time-stepped engine. Stateless layers (conv, linear, pooling) run once per chunk of time steps folded
into the batch; only the neurons loop over time. One simulation to T gives the accuracy at every t <= T.

Here: the speed knobs of the `sim` config resolved for an engine and a device (`engine_settings`), and simulate().
The interface every engine implements and the loop they share are in snnbench.simulation.backend; the engines
themselves in snnbench.simulation.engines.
"""

from typing import NamedTuple

import psutil
import torch
from torch import nn

from snnbench.simulation import engines
from snnbench.simulation.backend import Backend, Settings, SimulationResult
from snnbench.simulation.memory import step_elements

# Defaults for sim.sub_batch=auto (images simulated at once), sim.chunk=auto (time steps folded into one batch)
# and sim.channels_last=auto (feature-map layout) on each device, chosen by `snnbench bench` and by alternated runs
# in one process (docs/performance.md). CPU (2 cores, AMX), time / dense floor at batch 64, images x steps per
# block: MNIST CNN (T=64) 64x4 1.09-1.23, 32x8 1.10, 16x4 1.18, 16x8 1.05-1.12, 16x16 1.04-1.10, 8x16 1.12, 8x32
# 1.21; ResNet-20 (T=64) 64x4 1.31, 32x8 1.22, 16x16 1.20; VGG-11 (T=32) 64x4 0.39, 32x8 0.39, 16x16 0.40, 8x32
# 0.38, 8x8 0.45. A block of 16 images keeps a layer's membranes near the cores' caches (1.6 MB for the MNIST
# CNN's first layer); 16 steps keep 256 images for the convolutions. Channels-last (NHWC) made the engine 26-56 %
# faster than the standard layout (chunk 4): oneDNN's convolutions and, above all, average pooling are faster.
# CUDA (one H200, MNIST CNN, T=64, whole batches of 64): chunk 1, 8, 32, 64 gave 70k, 218k, 245k, 237k
# image-steps/s; the layout and blocks of images there are not measured yet.
DEFAULT_SUB_BATCH = {"cpu": 16, "cuda": None}  # None: the whole batch
DEFAULT_CHUNK = {"cpu": 16, "cuda": 32}
DEFAULT_CHANNELS_LAST = {"cpu": True, "cuda": False}


def memory_budget_mb(max_memory_mb, device) -> float:
    """sim.max_memory_mb, or when it is null half the memory free now: CUDA's free memory on a GPU, else the
    RAM the OS can hand out without swapping."""
    if max_memory_mb is not None:
        return float(max_memory_mb)
    if torch.device(device).type == "cuda":
        return 0.5 * torch.cuda.mem_get_info(device)[0] / 2**20
    return 0.5 * psutil.virtual_memory().available / 2**20


def choose_sub_batch(sub_batch, batch_size: int, device) -> int:
    """Images simulated at once: the configured number or the device default, at most the batch."""
    size = DEFAULT_SUB_BATCH[torch.device(device).type] if sub_batch in (None, "auto") else int(sub_batch)
    return min(size or batch_size, batch_size)


def choose_chunk(chunk, T: int, images: int, elements_per_image: int, max_memory_mb, device) -> int:
    """Time steps per folded chunk of `images` images: the configured number, or the device default, capped by
    memory."""
    steps = DEFAULT_CHUNK[torch.device(device).type] if chunk in (None, "auto") else int(chunk)
    # activations of a chunk: about twice the leaf outputs (inputs and outputs live at once), float32
    per_step_mb = 2 * 4 * elements_per_image * images / 2**20
    fits = max(1, int(memory_budget_mb(max_memory_mb, device) // max(per_step_mb, 1e-9)))
    return max(1, min(steps, fits, T))


def memory_format(channels_last, device) -> torch.memory_format:
    """sim.channels_last (true / false / auto = the device default) as the layout of 4-D feature maps."""
    if channels_last in (None, "auto"):
        channels_last = DEFAULT_CHANNELS_LAST[torch.device(device).type]
    return torch.channels_last if channels_last else torch.contiguous_format


LAYOUT_NAMES = {torch.channels_last: "channels-last", torch.contiguous_format: "standard layout"}


class EngineSettings(NamedTuple):
    """The `sim` config's speed knobs resolved for one engine, one network and one device."""
    engine: Backend                  # the engine (snnbench.simulation.engines), resolved for the device
    sub_batch: int                   # images per block
    chunk: int                       # steps per chunk
    blocks: int                      # blocks simulated at once
    layout: torch.memory_format

    def describe(self) -> str:
        return (f"{self.engine.describe()}, {self.sub_batch} images x {self.chunk} steps at a time, {self.blocks} "
                f"block{'s' if self.blocks > 1 else ''} at once, {LAYOUT_NAMES[self.layout]}")


def engine_settings(engine: Backend, sim, model: nn.Module, image: torch.Tensor, device) -> EngineSettings:
    """The `sim` config's speed knobs (sub_batch, batch_size, chunk, T, max_memory_mb, channels_last) resolved for
    `engine` simulating `model` (one `image` of its input) on `device`."""
    sub_batch, blocks = choose_sub_batch(sim.sub_batch, sim.batch_size, device), engine.blocks_at_once(device)
    chunk = engine.chunk(choose_chunk(sim.chunk, sim.T, sub_batch * blocks, step_elements(model, image),
                                      sim.max_memory_mb, device))
    return EngineSettings(engine, sub_batch, chunk, blocks, memory_format(sim.channels_last, device))


def simulate(model: nn.Module, batches, T: int, chunk: int, coding="direct", device="cpu", seed=0,
             progress=None, layout=torch.contiguous_format, sub_batch: int | None = None,
             engine: str | Backend | engines.Auto = "torch") -> SimulationResult:
    """Run T steps on every (images, labels) batch with `engine` (an engine, or its name in conf/engine:
    snnbench.simulation.engines.resolve), `sub_batch` images at a time (None: the whole batch); `chunk` steps are
    folded into one batch at a time (as the engine folds them); feature maps in `layout` (a
    torch.memory_format)."""
    settings = Settings(T, chunk, coding, device, seed, layout, sub_batch)
    return engines.resolve(engine, device).prepare(model, settings).run(batches, progress)
