"""The interface every simulation engine implements (`Backend`: a spiking network and the settings in, a
`Simulation` out) and the loop over blocks of images and chunks of steps that they share."""

import abc
import concurrent.futures
import ctypes
import queue
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from snnbench.core.graph import device_of, unique_name, value_nodes
from snnbench.core.neurons import IFNeuron, SpikingGraph
from snnbench.core.spike_product import SpikeProduct
from snnbench.core.stepped import RepeatSteps, Stepped

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
    # per product of spike trains, [3, T]: the events arriving, synaptic operations, multiply-accumulates at each t
    products: dict[str, torch.Tensor] = field(default_factory=dict)

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
        self.products = [{name: state for name, state in _stepped_of(module).items() if isinstance(state, SpikeProduct)}
                         for module in modules]
        self.stepped = [list(_stepped_of(module).values()) for module in modules]  # neurons, analog operators

    def run(self, batches, progress=None) -> SimulationResult:
        """T steps on every (images, labels) batch, `sub_batch` images at a time, `chunk` steps folded into one
        batch at a time, several blocks at once on a CPU; the counters stay on the device until the end. Poisson
        draws are seeded per block, so that they do not depend on which thread simulates which block."""
        T, device = self.settings.T, self.settings.device
        correct = torch.zeros(T, dtype=torch.long, device=device)
        events = {name: torch.zeros(T, dtype=torch.float64, device=device) for name in self.neurons[0]}
        units = {name: torch.zeros(T, dtype=torch.float64, device=device) for name in self.neurons[0]}
        products = {name: torch.zeros(3, T, dtype=torch.float64, device=device) for name in self.products[0]}
        num_images = 0
        blocks = enumerate(_parts(batches, self.settings.sub_batch, device, self.settings.layout))
        for images, (block_correct, block_events, block_units, block_products) in self._simulated(blocks):
            correct += block_correct
            for name in events:
                events[name] += block_events[name]
                units[name] += block_units[name]
            for name in products:
                products[name] += block_products[name]
            num_images += len(images)
            if progress:
                progress(len(images))
        return SimulationResult(correct.cpu(), num_images, {name: e.cpu() for name, e in events.items()},
                                {name: u.cpu() for name, u in units.items()},
                                {name: p.cpu() for name, p in products.items()})

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
        for state in self.stepped[graph]:
            state.begin(T)
        correct = torch.zeros(T, dtype=torch.long, device=settings.device)
        accumulated = None
        for start in range(0, T, chunk):
            steps = min(chunk, T - start)
            for state in self.stepped[graph]:
                state.next_chunk(steps)
            inputs = images if generator is None else placed(_poisson(images, steps, generator), settings.device,
                                                             settings.layout)
            # the output layer does not spike: the prediction at t is the argmax of its summed input up to t
            outputs = module(inputs).view(steps, batch, -1).cumsum(0)
            if accumulated is not None:
                outputs += accumulated
            accumulated = outputs[-1]
            correct[start:start + steps] = (outputs.argmax(-1) == labels).sum(1)
        return (correct, {name: neuron.events for name, neuron in neurons.items()},
                {name: neuron.units for name, neuron in neurons.items()},
                {name: product.counts for name, product in self.products[graph].items()})


def _neurons_of(module: torch.fx.GraphModule) -> dict[str, IFNeuron]:
    """The neurons a graph calls, by the name it calls them (also where another module of the graph holds one)."""
    return {name: neuron for name, neuron in _stepped_of(module).items() if isinstance(neuron, IFNeuron)}


def _stepped_of(module: torch.fx.GraphModule) -> dict[str, Stepped]:
    """The modules with a state over the steps (neurons, analog operators) a graph calls, by the name it calls
    them."""
    called = {node.target: module.get_submodule(node.target) for node in module.graph.nodes
              if node.op == "call_module"}
    return {name: state for name, state in called.items() if isinstance(state, Stepped)}


@dataclass(frozen=True)
class Backend(abc.ABC):
    """A way to simulate a spiking network (a module holding IFNeuron layers): a frozen dataclass subclass per
    engine, whose fields are its options, named by the `_target_` of its YAML in conf/engine/
    (snnbench.simulation.engines). An engine says where it can run (unavailable), where `engine=auto` should
    choose it (auto_preference), how many steps it folds (chunk) and how many blocks it simulates at once. It
    computes with modules of its own where it computes differently, in a module graph of its own built from the
    network's traced graph; it never replaces the network's modules or their forward methods."""
    name: str  # engine=<name>: its YAML's name, which names it in results (summary.json, the bench table)

    def unavailable(self, device) -> str | None:
        """Why this engine cannot simulate on `device` here, with the fix (None: it can)."""
        return None

    def auto_preference(self, device) -> int | None:
        """How much `engine=auto` wants this engine on `device`: the available engine with the highest number
        is chosen; None: auto never chooses it there."""
        return None

    def chunk(self, steps: int) -> int:
        """The time steps this engine folds into one batch when `steps` are asked for."""
        return steps

    def blocks_at_once(self, device, threads: int | None = None) -> int:
        """Blocks of images this engine simulates at once on `device` (blocks_at_once)."""
        return blocks_at_once(device, threads)

    def describe(self) -> str:
        """The engine and its options, for the log."""
        return f"{self.name} engine"

    def prepare(self, network: nn.Module, settings: Settings) -> Simulation:
        """`network`, moved to the settings' device and layout, as this engine simulates it: one module graph per
        block simulated at once. The first calls the network's own neurons where the engine does (so that hooks
        on them see the simulation), the others copies of them (a state of their own)."""
        settings = replace(settings, chunk=self.chunk(settings.chunk))
        network.eval().to(settings.device, memory_format=settings.layout)
        own = {module for module in network.modules() if isinstance(module, Stepped)}
        modules = []
        for number in range(self.blocks_at_once(settings.device, settings.threads)):
            module = self.module_graph(SpikingGraph(network), settings)  # traced here: fx's tracer is not threadsafe
            for name, state in _stepped_of(module).items():
                if number and state in own:
                    module.add_submodule(name, type(state).like(state))
            modules.append(with_constant_currents(module, settings.coding))
        return Simulation(modules, settings)

    @abc.abstractmethod
    def module_graph(self, graph: SpikingGraph, settings: Settings) -> torch.fx.GraphModule:
        """The module that computes `graph`'s network the way this engine does (SpikingGraph.with_modules)."""


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
        if node.op == "placeholder" or (module is not None and not isinstance(module, Stepped) and
                                         node.all_input_nodes and set(node.all_input_nodes) <= constant):
            constant.add(node)
            if module is not None:
                found[node.target] = ComputedOnce(module)
    return found


def with_constant_currents(module: torch.fx.GraphModule, coding: str) -> torch.fx.GraphModule:
    """`module` with its constant currents declared. Under direct coding what the graph computes from the image
    alone (before any stepped module) is one current for every step of a chunk, [rows, ...]: each stepped module
    that reads one is told so, and where one meets per-step values anywhere else (a residual addition of token
    embeddings and attention outputs, the output) it is repeated for the steps of the chunk (RepeatSteps)."""
    stepped = _stepped_of(module)
    for state in stepped.values():
        state.declare_constant_inputs(())
    if coding != "direct":
        return module
    values = value_nodes(module.graph)  # sizes of the image are not currents
    constant, per_step, repeated = set(), set(), {}
    for node in list(module.graph.nodes):
        if node.op == "call_module" and node.target in stepped:
            stepped[node.target].declare_constant_inputs(
                position for position, arg in enumerate(node.args) if arg in constant)
            per_step.add(node)
        elif node.op == "output" or any(arg in per_step for arg in node.all_input_nodes):
            per_step.add(node)
            for arg in [arg for arg in node.all_input_nodes if arg in constant]:
                if arg not in repeated:
                    name = unique_name(module, f"{arg.name}_repeated")
                    module.add_submodule(name, RepeatSteps())
                    with module.graph.inserting_after(arg):
                        repeated[arg] = module.graph.call_module(name, (arg,))
                node.replace_input_with(arg, repeated[arg])
        elif node in values:
            constant.add(node)
    if repeated:
        module.recompile()
    return module


def spiking_layers(model: nn.Module) -> dict[str, IFNeuron]:
    return {name: m for name, m in model.named_modules() if isinstance(m, IFNeuron)}


def activation_elements(model: nn.Module, sample: torch.Tensor) -> int:
    """Elements every leaf module outputs per image: the memory one folded time step costs."""
    total, hooks = [0], []
    for module in model.modules():
        if not list(module.children()):
            hooks.append(module.register_forward_hook(lambda m, i, o: total.__setitem__(0, total[0] + o[0].numel())))
    for state in (module for module in model.modules() if isinstance(module, Stepped)):
        state.begin(total_steps=1)
        state.next_chunk(1)
    with torch.inference_mode():
        model(sample[:1].to(device_of(model)))
    for h in hooks:
        h.remove()
    return total[0]


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
