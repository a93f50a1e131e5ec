"""The Python API: convert a PyTorch model with a method, simulate the spiking network, read its tables.

    conversion = snnbench.convert(model, "augmapping", calibration_images, T=8, c_max=2)
    result = snnbench.simulate(conversion, batches)      # batches: any iterable of (images, labels)
    result.accuracy, result.layers, result.summary       # accuracy.csv, layers.csv, summary.json's numbers
    snnbench.inspect(model, input_shape=(3, 32, 32))

`snnbench run` calls the same functions underneath (canonicalize, calibrate, the method's convert, simulate,
counts_of, tabulate, costs), so for the same model, images and settings both give the same numbers. Nothing
here imports Hydra, Typer or rich."""

from dataclasses import dataclass, fields, replace
from itertools import chain
from types import SimpleNamespace

import pandas as pd
import torch
from torch import nn

from snnbench import methods
from snnbench.conversion.methods import Conversion, Method, check_nonlinear, get, method_class
from snnbench.core.analog import analog_values
from snnbench.core.analysis import count_macs
from snnbench.core.calibrate import calibrate
from snnbench.core.counts import AC_PJ, MAC_PJ, costs, counts_of, tabulate
from snnbench.core.graph import canonicalize, device_of
from snnbench.core.inspection import Inspection, inspect
from snnbench.errors import UserError
from snnbench.simulation.memory import check_simulation_memory
from snnbench.simulation.simulate import engine_settings
from snnbench.simulation.simulate import simulate as simulate_network

__all__ = ["Converted", "Inspection", "Result", "convert", "inspect", "methods", "simulate"]

# conf/calibrate/default.yaml's batch_size: a tensor of calibration images is split into batches this large,
# as `snnbench run` draws them (percentiles are sampled per batch)
CALIBRATION_BATCH_SIZE = 128


@dataclass
class Converted:
    """A model converted by snnbench.convert."""
    method: Method            # the method and its knobs
    model: str                # the model's class name (accuracy.csv's `model` column)
    T: int                    # the time steps the conversion is for
    ann: nn.Module            # the canonical network the spiking one was made from (BatchNorm folded)
    conversion: Conversion    # the spiking network (.snn), its calibration, fan-out and per-layer diagnostics
    macs: dict[str, int]      # multiply-accumulates per image of each conv, linear layer and attention product of `ann`
    analog: dict[str, int]    # MACs per image and step of each analog operator of `ann` (nonlinear="compensate";
                              # the products of spike trains are counted by the simulation)

    @property
    def snn(self) -> nn.Module:
        return self.conversion.snn


@dataclass
class Result:
    """What snnbench.simulate measured, as `snnbench run` writes it."""
    accuracy: pd.DataFrame    # accuracy.csv: one row per t = 1..T, counts cumulative up to t
    layers: pd.DataFrame      # layers.csv: one row per spiking layer
    summary: dict             # summary.json's numbers: accuracies, MACs, events, SOPs per image, energies (uJ)
    counts: dict              # counts.json: the sums over the images behind the per-image numbers


def _method(method: str | Method, knobs: dict) -> Method:
    """`method` (a name or a Method) with `knobs` set, each checked by the method."""
    if isinstance(method, str):
        method = method_class(method)()
    elif not isinstance(method, Method):
        raise UserError(f"method must be a method's name ({', '.join(methods.available())}) or a "
                        f"snnbench.methods object, got {type(method).__name__}")
    known = [field.name for field in fields(method)]
    unknown = [key for key in knobs if key not in known]
    if unknown:
        raise UserError(f"method {method.name} has no knob {', '.join(unknown)}: its knobs are {', '.join(known)}")
    return replace(method, **knobs)


def _positive_int(key: str, value):
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise UserError(f"{key} must be a positive integer, got {value!r}")


def _image_batches(images) -> list[torch.Tensor]:
    """Calibration images as a list of batches: a tensor [N, ...] in batches of CALIBRATION_BATCH_SIZE, or the
    batches of an iterable of tensors or of (images, labels) pairs."""
    if isinstance(images, torch.Tensor):
        batches = list(images.split(CALIBRATION_BATCH_SIZE))
    else:
        batches = [batch[0] if isinstance(batch, tuple | list) else batch for batch in images]
    if not batches or not all(isinstance(batch, torch.Tensor) and len(batch) for batch in batches):
        raise UserError("calibration_images must be a tensor of images or batches of them (tensors, or (images, "
                        "labels) pairs), and not empty")
    return batches


def convert(model: nn.Module, method: str | Method, calibration_images, *, T: int, percentile: float = 99.9,
            per_channel: bool = False, calibration_rule: str = "percentile", maxpool: str = "error",
            nonlinear: str = "refuse", device=None, seed: int = 0, **knobs) -> Converted:
    """Convert `model` (any torch.fx-traceable network of ReLUs and linear maps; left unchanged) into a spiking
    network with `method` (a name, e.g. "augmapping", or a snnbench.methods object) for T time steps. Its knobs
    can be given as keyword arguments (c_max=2). The thresholds are calibrated on `calibration_images` (training
    images: a tensor, or batches of them) as conf/calibrate sets it: the `percentile` of each layer's
    activations, per layer or `per_channel`, or `calibration_rule="local_balancing"`. `maxpool="avg"` converts max
    pooling as average pooling; `nonlinear` is conf/config.yaml's convert.nonlinear. `device`: where the conversion
    runs (None: the model's)."""
    method = _method(method, knobs)
    check_nonlinear(method.name, nonlinear)
    _positive_int("T", T)
    if isinstance(percentile, bool) or not isinstance(percentile, int | float) or not 0 < percentile <= 100:
        raise UserError(f"percentile must be in (0, 100], got {percentile!r}: e.g. 99.9, or 100 for the maximum")
    batches = _image_batches(calibration_images)
    device = device or device_of(model)
    ann = canonicalize(model, maxpool, nonlinear).module.to(device)
    calibration = calibrate(ann, batches, percentile, per_channel, device, seed, calibration_rule)
    # the parts of the run config that a method's convert reads
    run = SimpleNamespace(method=method, sim=SimpleNamespace(T=T), calibrate=SimpleNamespace(percentile=percentile),
                          seed=seed)
    conversion = get(method.name).convert(ann, calibration, run, batches)
    return Converted(method, type(model).__name__, T, ann, conversion, count_macs(ann, batches[0]),
                     analog_values(ann, batches[0]))


def _scoring_ann(ann: nn.Module, batches, correct: list):
    """The (images, labels) batches, each scored by the ANN as it passes: its correct predictions appended."""
    for images, labels in batches:
        with torch.inference_mode():
            predictions = ann(images.to(device_of(ann))).argmax(1).cpu()
        correct.append((predictions == labels.cpu()).sum().item())
        yield images, labels


def simulate(converted: Converted, batches, T: int | None = None, *, coding: str = "direct", engine: str = "auto",
             device=None, seed: int = 0, sub_batch="auto", chunk="auto", channels_last="auto", integer_conv="auto",
             max_memory_mb: float | None = None, mac_pj: float = MAC_PJ, ac_pj: float = AC_PJ,
             dataset: str = "") -> Result:
    """Simulate the converted network for T steps (None: the T it was converted for) on every (images, labels)
    batch of `batches` (any iterable, read once), with the ANN scored on the same images. One simulation gives
    the accuracy at every t <= T. The other arguments are conf/sim's (`coding`: direct | poisson; `engine`: auto,
    torch, int8, triton or reference; the speed knobs) and the energy per MAC and per synaptic operation in
    picojoules; `dataset` names the images in the tables."""
    T = converted.T if T is None else T
    _positive_int("T", T)
    if coding not in ("direct", "poisson"):
        raise UserError(f"coding must be direct or poisson, got {coding!r}")
    snn = converted.snn
    device = device or device_of(snn)
    batches = iter(batches)
    first = next(batches, None)
    if first is None:
        raise UserError("batches holds no (images, labels) batch to simulate")
    sample = first[0]
    sim = SimpleNamespace(engine=engine, integer_conv=integer_conv, sub_batch=sub_batch, batch_size=len(sample),
                          chunk=chunk, T=T, max_memory_mb=max_memory_mb, channels_last=channels_last)
    settings = engine_settings(sim, snn, sample, device)
    check_simulation_memory(snn, sample, T, settings.sub_batch, settings.chunk, device)
    ann_correct = []
    result = simulate_network(snn, _scoring_ann(converted.ann, chain([first], batches), ann_correct), T,
                              settings.chunk, coding, device, seed, layout=settings.layout,
                              sub_batch=settings.sub_batch, engine=settings.engine,
                              integer_min_depth=settings.integer_min_depth)
    ann_accuracy = sum(ann_correct) / max(result.num_images, 1)
    conversion = converted.conversion
    counts = counts_of(result, conversion.fan_out, ann_accuracy)
    accuracy, layers = tabulate(counts, conversion.calibration, snn, conversion.diagnostics, T,
                                method=converted.method.name, dataset=dataset, model=converted.model,
                                analog=converted.analog)
    summary = {"ann_accuracy": ann_accuracy, "snn_accuracy": float(accuracy.accuracy.iloc[-1]), "T": T,
               "method": converted.method.name, "dataset": dataset, "model": converted.model,
               "num_test_images": result.num_images, "coding": coding, "device": str(device),
               "engine": settings.engine, **costs(accuracy, converted.macs, coding, mac_pj, ac_pj,
                                                                 converted.analog, counts)}
    return Result(accuracy, layers, summary, counts)
