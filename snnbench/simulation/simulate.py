"""The time-stepped engine. Stateless layers (conv, linear, pooling) run once per chunk of time steps folded
into the batch; only the neurons loop over time. One simulation to T gives the accuracy at every t <= T.

Here: the engine knobs of the `sim` config resolved for a device (`engine_settings`), the interface every backend
implements (`Backend`: a spiking network and the settings in, a `Simulation` out) and the loop over blocks of
images and chunks of steps that they share. The backends themselves are the modules of snnbench.simulation.engines.
"""

from typing import NamedTuple

import psutil
import torch
from torch import nn

from snnbench.errors import UserError
from snnbench.simulation import engines
from snnbench.simulation.backend import Settings, SimulationResult, blocks_at_once
from snnbench.simulation.integer_conv import cpu_has_amx
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
# sim.integer_conv=auto computes in integers the spike-fed convs and linear layers at least this deep (multiply-
# accumulates per output value: input channels x kernel taps). On this CPU (AMX, batch 256, docs/performance.md)
# one conv of depth 144 ran 1.45x slower in integers than in float32, depth 288 0.64-0.81x, 576 0.56-0.80x, 1152
# and more 0.05-0.43x. In whole runs (ResNet-20, T=64, 128 images; simulate time) every spike-fed layer in
# integers was no faster than none (4.41-4.74 against 4.38-4.50 s), depth >= 512 4.05-4.28 s, >= 256 3.90-4.15 s.
INTEGER_MIN_DEPTH = 256


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
    """The `sim` config's engine knobs resolved for one network on one device."""
    engine: str                      # the backend (snnbench.simulation.engines)
    sub_batch: int                   # images per block
    chunk: int                       # steps per chunk
    blocks: int                      # blocks simulated at once (blocks_at_once)
    layout: torch.memory_format
    integer_min_depth: int | None    # the int8 engine's integer layers (None: another engine)

    def describe(self) -> str:
        integer = "" if self.integer_min_depth is None else f", integer layers of depth >= {self.integer_min_depth}"
        return (f"{self.engine} engine, {self.sub_batch} images x {self.chunk} steps at a time, {self.blocks} "
                f"block{'s' if self.blocks > 1 else ''} at once, {LAYOUT_NAMES[self.layout]}{integer}")


def engine_settings(sim, model: nn.Module, image: torch.Tensor, device) -> EngineSettings:
    """The `sim` config's engine knobs resolved for `model` (one `image` of its input) on `device`."""
    engine, min_depth = choose_engine(sim.engine, sim.integer_conv, device)
    sub_batch, blocks = choose_sub_batch(sim.sub_batch, sim.batch_size, device), blocks_at_once(device, None, engine)
    chunk = 1 if engine == "reference" else choose_chunk(sim.chunk, sim.T, sub_batch * blocks,
                                                         step_elements(model, image), sim.max_memory_mb, device)
    return EngineSettings(engine, sub_batch, chunk, blocks, memory_format(sim.channels_last, device), min_depth)


def choose_engine(setting, integer_conv, device) -> tuple[str, int | None]:
    """sim.engine and sim.integer_conv on `device` as the backend to simulate with and, for int8, the smallest
    depth of its integer layers (None for the other backends). auto is the fastest measured for the device: on a
    GPU the fused Triton kernel (torch where Triton cannot run); on a CPU int8 where sim.integer_conv is true, or
    auto on a CPU with AMX (where it was measured faster), else torch."""
    if setting != "auto" and setting not in engines.names():
        raise UserError(f"sim.engine must be auto or one of {', '.join(engines.names())}, got {setting!r}")
    if setting == "auto" and torch.device(device).type == "cpu":
        measured = integer_conv is True or (integer_conv == "auto" and cpu_has_amx())
        setting = "int8" if measured and engines.get("int8").unavailable(device) is None else "torch"
    elif setting == "auto":
        setting = "triton" if engines.get("triton").unavailable(device) is None else "torch"
    if integer_conv is True and setting != "int8":
        raise UserError(f"sim.integer_conv=true asks for the int8 engine, which needs device=cpu and a PyTorch "
                        f"with oneDNN's int8 convolution (here: sim.engine={setting} on {device}): set "
                        "sim.integer_conv=auto or false")
    if setting == "int8" and integer_conv is False:
        raise UserError("sim.engine=int8 computes the spike-fed layers in integers, which sim.integer_conv=false "
                        "turns off: set sim.integer_conv=auto or true, or another sim.engine")
    reason = engines.get(setting).unavailable(device)
    if reason:
        raise UserError(reason)
    return setting, int8_min_depth(integer_conv) if setting == "int8" else None


def int8_min_depth(integer_conv) -> int | None:
    """The int8 engine's smallest depth (multiply-accumulates per output value) of a spike-fed conv or linear
    layer in integers, for sim.integer_conv: true every one (0), auto those INTEGER_MIN_DEPTH deep, false none
    (None: no int8 engine)."""
    if integer_conv is False:
        return None
    return 0 if integer_conv is True else INTEGER_MIN_DEPTH


def simulate(model: nn.Module, batches, T: int, chunk: int, coding="direct", device="cpu", seed=0,
             progress=None, layout=torch.contiguous_format, sub_batch: int | None = None, engine: str = "torch",
             integer_min_depth: int | None = 0) -> SimulationResult:
    """Run T steps on every (images, labels) batch with the backend `engine` (snnbench.simulation.engines), `sub_batch`
    images at a time (None: the whole batch); `chunk` steps are folded into one batch at a time; feature maps in
    `layout` (a torch.memory_format); with the int8 engine the spike-fed convs and linear layers at least
    `integer_min_depth` deep compute in integers."""
    settings = Settings(T, chunk, coding, device, seed, layout, sub_batch, integer_min_depth)
    return engines.get(engine).prepare(model, settings).run(batches, progress)
