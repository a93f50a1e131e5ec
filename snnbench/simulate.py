"""The time-stepped engine. Stateless layers (conv, linear, pooling) run once per chunk of time steps folded
into the batch; only the neurons loop over time. One simulation to T gives the accuracy at every t <= T."""

import contextlib
import ctypes
from dataclasses import dataclass

import psutil
import torch
from torch import nn

from snnbench.convert import device_of
from snnbench.errors import UserError
from snnbench.integer_conv import cpu_has_amx, int8_conv_available, integer_layers
from snnbench.neurons import IFNeuron, SpikingGraph

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
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def reuse_freed_memory():
    """Have glibc serve large blocks from the heap and keep them when freed. By default each block over 32 MB (a
    chunk's feature maps) is a fresh mapping whose pages the kernel zeroes on first touch, one fault per page, on
    every chunk: 4x the cost of filling the block (docs/performance.md). Called where a process starts to simulate
    (a run, a bench engine); nothing happens without glibc."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):  # no C library to open (Windows), or no mallopt in it (macOS)
        return
    for parameter in (M_MMAP_THRESHOLD, M_TRIM_THRESHOLD):
        mallopt(parameter, 1 << 30)


@dataclass
class SimulationResult:
    correct: torch.Tensor            # [T] correct predictions at each t
    num_images: int
    events: dict[str, torch.Tensor]  # per spiking layer, [T] events (non-zero coefficients) at each t
    units: dict[str, torch.Tensor]   # per spiking layer, [T] spike units (sum of |c|) at each t

    def accuracy(self) -> torch.Tensor:
        return self.correct.double() / max(self.num_images, 1)


def spiking_layers(model: nn.Module) -> dict[str, IFNeuron]:
    return {name: m for name, m in model.named_modules() if isinstance(m, IFNeuron)}


def activation_elements(model: nn.Module, sample: torch.Tensor) -> int:
    """Elements every leaf module outputs per image: the memory one folded time step costs."""
    total, hooks = [0], []
    for module in model.modules():
        if not list(module.children()):
            hooks.append(module.register_forward_hook(lambda m, i, o: total.__setitem__(0, total[0] + o[0].numel())))
    neurons = spiking_layers(model).values()
    for neuron in neurons:
        neuron.reset(batch=1, total_steps=1)
        neuron.steps = 1
    with torch.inference_mode():
        model(sample[:1].to(device_of(model)))
    for h in hooks:
        h.remove()
    return total[0]


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


def engine_settings(sim, model: nn.Module, image: torch.Tensor, device) -> tuple:
    """The `sim` config's engine knobs resolved for `model` (one `image` of its input) on `device`: (images per
    block, steps per chunk, feature-map layout, integer layers' minimum depth), and their one-line description."""
    sub_batch = choose_sub_batch(sim.sub_batch, sim.batch_size, device)
    chunk = choose_chunk(sim.chunk, sim.T, sub_batch, activation_elements(model, image), sim.max_memory_mb, device)
    layout, min_depth = memory_format(sim.channels_last, device), integer_min_depth(sim.integer_conv, device)
    integer = "" if min_depth is None else f", integer layers of depth >= {min_depth}"
    description = f"{sub_batch} images x {chunk} steps at a time, {LAYOUT_NAMES[layout]}{integer}"
    return (sub_batch, chunk, layout, min_depth), description


def integer_min_depth(setting, device) -> int | None:
    """sim.integer_conv (true / false / auto) on `device` as the smallest depth (multiply-accumulates per output
    value) of a spike-fed conv or linear layer that computes in integers, None for none. true: every one (0);
    auto: INTEGER_MIN_DEPTH on a CPU with AMX, where it was measured; elsewhere it is not measured, so none."""
    on_cpu = torch.device(device).type == "cpu"
    if setting in (None, "auto"):
        return INTEGER_MIN_DEPTH if on_cpu and cpu_has_amx() and int8_conv_available() else None
    if setting and not (on_cpu and int8_conv_available()):
        raise UserError("sim.integer_conv=true needs device=cpu and a PyTorch with oneDNN's int8 convolution "
                        f"(device here: {device}): set sim.integer_conv=false or auto")
    return 0 if setting else None


class _LastResult:
    """A module's forward that returns its last output again when called with the same input tensor (the same
    object: the images of one batch, or what such a module returned)."""

    def __init__(self, forward):
        self.forward, self.input, self.output = forward, None, None

    def __call__(self, x):
        if x is not self.input:
            self.input, self.output = x, self.forward(x)
        return self.output


@contextlib.contextmanager
def constant_inputs_computed_once(model: nn.Module):
    """Within the block the modules between the input and the first neurons (stateless, fed only the input or
    one another) compute once per input tensor: with direct coding every chunk of a batch feeds the same images,
    so their currents are computed once per batch, not once per chunk."""
    graph, constant, memoised = SpikingGraph(model), set(), []
    for node in graph.nodes:
        module = graph.module(node)
        if node.op == "placeholder" or (module is not None and not isinstance(module, IFNeuron) and
                                         node.all_input_nodes and set(node.all_input_nodes) <= constant):
            constant.add(node)
            if module is not None and module not in memoised:
                module.forward = _LastResult(module.forward)
                memoised.append(module)
    try:
        yield
    finally:
        for module in memoised:
            del module.forward


def placed(x: torch.Tensor, device, layout: torch.memory_format) -> torch.Tensor:
    """`x` on `device`, in `layout` when it is a batch of feature maps."""
    return x.to(device, memory_format=layout) if x.dim() == 4 else x.to(device)


def _poisson(images: torch.Tensor, steps: int, generator: torch.Generator) -> torch.Tensor:
    """Bernoulli spikes with probability = intensity, one draw per step, folded into the batch."""
    draws = torch.rand((steps, *images.shape), generator=generator, device=images.device)
    return (draws < images).to(images.dtype).flatten(0, 1)


def _parts(batches, size: int | None, device, layout):
    """Each (images, labels) batch on the device, in parts of at most `size` images (None: whole)."""
    for images, labels in batches:
        images, labels = placed(images, device, layout), labels.to(device)
        size_here = size or len(labels)
        for first in range(0, len(labels), size_here):
            yield images[first:first + size_here], labels[first:first + size_here]


@torch.inference_mode()
def simulate(model: nn.Module, batches, T: int, chunk: int, coding="direct", device="cpu", seed=0,
             progress=None, layout=torch.contiguous_format, integer_min_depth=None,
             sub_batch: int | None = None) -> SimulationResult:
    """Run T steps on every (images, labels) batch, `sub_batch` images at a time (None: the whole batch); `chunk`
    steps are folded into one batch at a time; feature maps in `layout` (a torch.memory_format); the spike-fed
    convs and linear layers at least `integer_min_depth` deep compute in integers (None: none)."""
    model = model.eval().to(device, memory_format=layout)
    computed_once = constant_inputs_computed_once if coding == "direct" else contextlib.nullcontext
    with computed_once(model), integer_layers(model, integer_min_depth):
        neurons = spiking_layers(model)
        correct = torch.zeros(T, dtype=torch.long)
        events = {name: torch.zeros(T, dtype=torch.float64) for name in neurons}
        units = {name: torch.zeros(T, dtype=torch.float64) for name in neurons}
        generator = torch.Generator(device=device).manual_seed(seed)
        num_images = 0
        for images, labels in _parts(batches, sub_batch, device, layout):
            batch = images.shape[0]
            for neuron in neurons.values():
                neuron.reset(batch, T)
            accumulated = None
            for start in range(0, T, chunk):
                steps = min(chunk, T - start)
                for neuron in neurons.values():
                    neuron.steps = steps
                inputs = images if coding == "direct" else placed(_poisson(images, steps, generator), device, layout)
                # the output layer does not spike: the prediction at t is the argmax of its summed input up to t
                outputs = model(inputs).view(steps, batch, -1).cumsum(0)
                if accumulated is not None:
                    outputs += accumulated
                accumulated = outputs[-1]
                correct[start:start + steps] += (outputs.argmax(-1) == labels).sum(1).cpu()
            for name, neuron in neurons.items():
                events[name] += neuron.events
                units[name] += neuron.units
            num_images += batch
            if progress:
                progress(batch)
        return SimulationResult(correct, num_images, events, units)


def simulate_step_by_step(model, batches, T: int, coding="direct", device="cpu", seed=0,
                          layout=torch.contiguous_format, integer_min_depth=None,
                          sub_batch: int | None = None) -> SimulationResult:
    """The test oracle: one full network pass per time step, nothing folded (the same parts of each batch, so
    that Poisson coding draws the same spikes)."""
    return simulate(model, batches, T, chunk=1, coding=coding, device=device, seed=seed, layout=layout,
                    integer_min_depth=integer_min_depth, sub_batch=sub_batch)
