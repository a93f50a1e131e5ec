"""The time-stepped engine. Stateless layers (conv, linear, pooling) run once per chunk of time steps folded
into the batch; only the neurons loop over time. One simulation to T gives the accuracy at every t <= T.

Here: the engine knobs of the `sim` config resolved for a device (`engine_settings`), the interface every backend
implements (`Backend`: a spiking network and the settings in, a `Simulation` out) and the loop over blocks of
images and chunks of steps that they share. The backends themselves are the modules of snnbench.engines.
"""

import abc
import concurrent.futures
import ctypes
import queue
from dataclasses import dataclass
from typing import NamedTuple

import psutil
import torch
from torch import nn

from snnbench import engines
from snnbench.convert import device_of
from snnbench.errors import UserError
from snnbench.integer_conv import cpu_has_amx
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


@dataclass(frozen=True)
class Settings:
    """How to simulate: what a backend needs besides the network."""
    T: int
    chunk: int                                            # time steps folded into one batch
    coding: str = "direct"                                # direct | poisson
    device: str | torch.device = "cpu"
    seed: int = 0                                         # Poisson draws
    layout: torch.memory_format = torch.contiguous_format  # of 4-D feature maps
    sub_batch: int | None = None                          # images simulated at once (None: whole batches)
    integer_min_depth: int | None = 0                     # int8: the shallowest spike-fed layer in integers
    threads: int | None = None                            # CPU: blocks simulated at once (None: torch's threads)


def blocks_at_once(device, threads: int | None = None) -> int:
    """Blocks of images simulated at once, each by a thread of its own: on a CPU as many as torch's intra-op
    threads (or `threads`), each computing with one thread; on a GPU one (its kernels run asynchronously anyway)."""
    if torch.device(device).type != "cpu":
        return 1
    return threads or torch.get_num_threads()


class Simulation:
    """A backend's module graphs of one network, ready to simulate batches: one graph per block simulated at
    once, each with a state of its own."""

    def __init__(self, modules: list[torch.fx.GraphModule], settings: Settings):
        self.modules, self.settings = modules, settings
        self.neurons = [_neurons_of(module) for module in modules]

    def run(self, batches, progress=None) -> SimulationResult:
        """T steps on every (images, labels) batch, `sub_batch` images at a time, `chunk` steps folded into one
        batch at a time, several blocks at once on a CPU; the counters stay on the device until the end. Poisson
        draws are seeded per block, so that they do not depend on which thread simulates which block."""
        T, device = self.settings.T, self.settings.device
        correct = torch.zeros(T, dtype=torch.long, device=device)
        events = {name: torch.zeros(T, dtype=torch.float64, device=device) for name in self.neurons[0]}
        units = {name: torch.zeros(T, dtype=torch.float64, device=device) for name in self.neurons[0]}
        num_images = 0
        blocks = enumerate(_parts(batches, self.settings.sub_batch, device, self.settings.layout))
        for images, (block_correct, block_events, block_units) in self._simulated(blocks):
            correct += block_correct
            for name in events:
                events[name] += block_events[name]
                units[name] += block_units[name]
            num_images += len(images)
            if progress:
                progress(len(images))
        return SimulationResult(correct.cpu(), num_images, {name: e.cpu() for name, e in events.items()},
                                {name: u.cpu() for name, u in units.items()})

    def _simulated(self, blocks):
        """(images, result) of every (index, (images, labels)) block, one at a time or, with several graphs, each
        on a thread of its own with one intra-op thread: no block waits for another's threads to meet (the
        barriers of an op split over threads, which stall when other jobs take the cores: docs/performance.md)."""
        if len(self.modules) == 1:
            for index, (images, labels) in blocks:
                yield images, self._block(0, index, images, labels)
            return
        free = queue.SimpleQueue()
        for graph in range(len(self.modules)):
            free.put(graph)

        def on_a_free_graph(index, images, labels):
            graph = free.get()
            try:
                return images, self._block(graph, index, images, labels)
            finally:
                free.put(graph)

        threads = torch.get_num_threads()
        pool = concurrent.futures.ThreadPoolExecutor(len(self.modules), initializer=torch.set_num_threads,
                                                     initargs=(1,))
        pending = set()
        try:
            for index, (images, labels) in blocks:
                pending.add(pool.submit(on_a_free_graph, index, images, labels))
                if len(pending) >= 2 * len(self.modules):  # a few blocks ahead, not the whole data set
                    done, pending = concurrent.futures.wait(pending, return_when="FIRST_COMPLETED")
                    yield from (future.result() for future in done)
            yield from (future.result() for future in concurrent.futures.as_completed(pending))
        finally:  # also when the caller stops early (an interrupt): the blocks not started are dropped
            pool.shutdown(cancel_futures=True)
            torch.set_num_threads(threads)  # the threads' setting also reached process-wide libraries (MKL)

    @torch.inference_mode()
    def _block(self, graph: int, index: int, images: torch.Tensor, labels: torch.Tensor):
        """T steps of one block of images on graph number `graph`: correct predictions, events and spike units
        per layer at every step."""
        module, neurons, settings = self.modules[graph], self.neurons[graph], self.settings
        T, chunk, batch = settings.T, settings.chunk, images.shape[0]
        generator = (torch.Generator(device=settings.device).manual_seed(settings.seed * 1_000_003 + index)
                     if settings.coding == "poisson" else None)
        for neuron in neurons.values():
            neuron.reset(batch, T)
        correct = torch.zeros(T, dtype=torch.long, device=settings.device)
        accumulated = None
        for start in range(0, T, chunk):
            steps = min(chunk, T - start)
            for neuron in neurons.values():
                neuron.steps = steps
            inputs = images if generator is None else placed(_poisson(images, steps, generator), settings.device,
                                                             settings.layout)
            # the output layer does not spike: the prediction at t is the argmax of its summed input up to t
            outputs = module(inputs).view(steps, batch, -1).cumsum(0)
            if accumulated is not None:
                outputs += accumulated
            accumulated = outputs[-1]
            correct[start:start + steps] = (outputs.argmax(-1) == labels).sum(1)
        return (correct, {name: neuron.events for name, neuron in neurons.items()},
                {name: neuron.units for name, neuron in neurons.items()})


def _neurons_of(module: torch.fx.GraphModule) -> dict[str, IFNeuron]:
    """The neurons a graph calls, by the name it calls them (also where another module of the graph holds one)."""
    called = {node.target: module.get_submodule(node.target) for node in module.graph.nodes
              if node.op == "call_module"}
    return {name: neuron for name, neuron in called.items() if isinstance(neuron, IFNeuron)}


class Backend(abc.ABC):
    """A way to simulate a spiking network (a module holding IFNeuron layers): one module of snnbench.engines
    each, as its BACKEND. A backend computes with modules of its own where it computes differently, in a module
    graph of its own built from the network's traced graph; it never replaces the network's modules or their
    forward methods."""
    name: str  # sim.engine=<name>

    def unavailable(self, device) -> str | None:
        """Why this backend cannot simulate on `device` here, with the fix (None: it can)."""
        return None

    def prepare(self, network: nn.Module, settings: Settings) -> Simulation:
        """`network`, moved to the settings' device and layout, as this backend simulates it: one module graph per
        block simulated at once. The first calls the network's own neurons where the backend does (so that hooks
        on them see the simulation), the others copies of them (a state of their own)."""
        network.eval().to(settings.device, memory_format=settings.layout)
        own = set(spiking_layers(network).values())
        modules = []
        for number in range(blocks_at_once(settings.device, settings.threads)):
            module = self.module_graph(SpikingGraph(network), settings)  # traced here: fx's tracer is not threadsafe
            for name, neuron in _neurons_of(module).items():
                if number and neuron in own:
                    module.add_submodule(name, type(neuron).like(neuron))
            modules.append(module)
        return Simulation(modules, settings)

    @abc.abstractmethod
    def module_graph(self, graph: SpikingGraph, settings: Settings) -> torch.fx.GraphModule:
        """The module that computes `graph`'s network the way this backend does (SpikingGraph.with_modules)."""


class ComputedOnce(nn.Module):
    """`module`, giving its last output again when called with the same input tensor (the same object: the
    images of one block, or what such a module returned)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module, self.input, self.output = module, None, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x is not self.input:
            self.input, self.output = x, self.module(x)
        return self.output


def computed_once(graph: SpikingGraph) -> dict[str, nn.Module]:
    """The modules between the input and the first neurons (stateless, fed only the input or one another), each
    computed once per input tensor, by name: with direct coding every chunk of a block feeds the same images, so
    their currents are computed once per block, not once per chunk."""
    constant, found = set(), {}
    for node in graph.nodes:
        module = graph.module(node)
        if node.op == "placeholder" or (module is not None and not isinstance(module, IFNeuron) and
                                         node.all_input_nodes and set(node.all_input_nodes) <= constant):
            constant.add(node)
            if module is not None:
                found[node.target] = ComputedOnce(module)
    return found


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


class EngineSettings(NamedTuple):
    """The `sim` config's engine knobs resolved for one network on one device."""
    engine: str                      # the backend (snnbench.engines)
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
    sub_batch, blocks = choose_sub_batch(sim.sub_batch, sim.batch_size, device), blocks_at_once(device)
    chunk = 1 if engine == "reference" else choose_chunk(sim.chunk, sim.T, sub_batch * blocks,
                                                         activation_elements(model, image), sim.max_memory_mb, device)
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


def simulate(model: nn.Module, batches, T: int, chunk: int, coding="direct", device="cpu", seed=0,
             progress=None, layout=torch.contiguous_format, sub_batch: int | None = None, engine: str = "torch",
             integer_min_depth: int | None = 0) -> SimulationResult:
    """Run T steps on every (images, labels) batch with the backend `engine` (snnbench.engines), `sub_batch`
    images at a time (None: the whole batch); `chunk` steps are folded into one batch at a time; feature maps in
    `layout` (a torch.memory_format); with the int8 engine the spike-fed convs and linear layers at least
    `integer_min_depth` deep compute in integers."""
    settings = Settings(T, chunk, coding, device, seed, layout, sub_batch, integer_min_depth)
    return engines.get(engine).prepare(model, settings).run(batches, progress)
