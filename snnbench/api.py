"""The Python API: convert a PyTorch model with a method, simulate the spiking network, read its tables.

    conversion = snnbench.convert(model, "augmapping", calibration_images, T=8, c_max=2)
    result = snnbench.simulate(conversion, batches)      # batches: any iterable of (images, labels)
    result.accuracy, result.layers, result.summary       # accuracy.csv, layers.csv, summary.json's numbers
    snnbench.inspect(model, input_shape=(3, 32, 32))

snnbench.convert is made of finer public steps, which `snnbench run` calls between its cache stages: canonical
(the network every later step reads), calibrate, convert_canonical (the method's conversion) and converted_of
(the conversion with the costs of the ANN it came from); `run` then calls snnbench.simulate. So for the same
model, images and settings the command line and the API give the same numbers. Nothing here imports Hydra,
Typer or rich."""

import logging
from dataclasses import dataclass, replace
from itertools import chain
from types import SimpleNamespace

import pandas as pd
import torch
from torch import nn

from snnbench import methods
from snnbench.conversion.methods import Context, Conversion, Method, check_knobs, check_nonlinear
from snnbench.core.analog import analog_values
from snnbench.core.analysis import count_macs
from snnbench.core.calibrate import Calibration
from snnbench.core.calibrate import calibrate as calibrate_network
from snnbench.core.counts import AC_PJ, MAC_PJ, costs, counts_of, tabulate
from snnbench.core.graph import canonicalize, device_of
from snnbench.core.inspection import Inspection, inspect
from snnbench.errors import UserError
from snnbench.simulation import engines
from snnbench.simulation.backend import Backend
from snnbench.simulation.engines import Auto
from snnbench.simulation.memory import check_simulation_memory
from snnbench.simulation.simulate import engine_settings
from snnbench.simulation.simulate import simulate as simulate_network

__all__ = ["Converted", "Inspection", "Result", "calibrate", "canonical", "convert", "convert_canonical",
           "converted_of", "inspect", "methods", "simulate"]

log = logging.getLogger("snnbench")

# conf/calibrate/default.yaml's batch_size: a tensor of calibration images is split into batches this large,
# as `snnbench run` draws them (percentiles are sampled per batch)
CALIBRATION_BATCH_SIZE = 128


@dataclass
class Converted:
    """A model converted by snnbench.convert."""
    method: Method            # the method and its knobs
    model: str                # the model's name (accuracy.csv's `model` column): its class name for the API
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
    summary: dict             # summary.json's numbers: accuracies, MACs, events, SOPs per image, energies (uJ),
                              # the engine and its settings
    counts: dict              # counts.json: the sums over the images behind the per-image numbers


def _method(method: str | Method, knobs: dict) -> Method:
    """`method` (a name or a Method) with `knobs` set, each checked by the method."""
    if isinstance(method, str):
        return methods.named(method, **knobs)
    if not isinstance(method, Method):
        raise UserError(f"method must be a method's name ({', '.join(methods.available())}) or a "
                        f"snnbench.methods object, got {type(method).__name__}")
    check_knobs(type(method), knobs, method.name)
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


def canonical(model: nn.Module, *, maxpool: str = "error", nonlinear: str = "refuse") -> nn.Module:
    """The canonical network of `model` (left unchanged) that calibration, conversion and simulation read:
    BatchNorm folded, one ReLU module per call site, `maxpool="avg"` converting max pooling as average pooling,
    `nonlinear` conf/config.yaml's convert.nonlinear (refuse, or compensate: analog operators)."""
    return canonicalize(model, maxpool, nonlinear).module


def calibrate(ann: nn.Module, calibration_images, *, percentile: float = 99.9, per_channel: bool = False,
              rule: str = "percentile", device=None, seed: int = 0) -> Calibration:
    """The thresholds of every spiking layer of the canonical network `ann` on `calibration_images` (training
    images: a tensor, or batches of them), as conf/calibrate sets them: the `percentile` of each layer's
    activations (sampled with `seed`), per layer or `per_channel`, or `rule="local_balancing"`."""
    if isinstance(percentile, bool) or not isinstance(percentile, int | float) or not 0 < percentile <= 100:
        raise UserError(f"percentile must be in (0, 100], got {percentile!r}: e.g. 99.9, or 100 for the maximum")
    return calibrate_network(ann, _image_batches(calibration_images), percentile, per_channel,
                             device or device_of(ann), seed, rule)


def convert_canonical(ann: nn.Module, method: str | Method, calibration: Calibration, calibration_images, *,
                      T: int, percentile: float = 99.9, seed: int = 0, **knobs) -> Conversion:
    """The spiking network `method` (a name or a snnbench.methods object, `knobs` set over it) makes of the
    canonical network `ann` calibrated as `calibration` on `calibration_images`, for T time steps; `percentile`
    and `seed` are the calibration's, for the methods that calibrate again."""
    _positive_int("T", T)
    return _method(method, knobs).convert(ann, calibration, _image_batches(calibration_images),
                                          Context(T, percentile, seed))


def converted_of(conversion: Conversion, ann: nn.Module, method: Method, sample: torch.Tensor, *, T: int,
                 model: str) -> Converted:
    """`conversion` of the canonical network `ann` by `method` for T steps, with the MACs of `ann` counted on a
    batch of its input (`sample`): what snnbench.simulate takes. `model` names the network in the tables."""
    return Converted(method, model, T, ann, conversion, count_macs(ann, sample), analog_values(ann, sample))


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
    check_nonlinear(method, nonlinear)
    _positive_int("T", T)
    batches = _image_batches(calibration_images)
    device = device or device_of(model)
    ann = canonical(model, maxpool=maxpool, nonlinear=nonlinear).to(device)
    calibration = calibrate(ann, batches, percentile=percentile, per_channel=per_channel, rule=calibration_rule,
                            device=device, seed=seed)
    conversion = convert_canonical(ann, method, calibration, batches, T=T, percentile=percentile, seed=seed)
    return converted_of(conversion, ann, method, batches[0], T=T, model=type(model).__name__)


def _scoring_ann(ann: nn.Module, batches, correct: list):
    """The (images, labels) batches, each scored by the ANN as it passes: its correct predictions appended."""
    for images, labels in batches:
        with torch.inference_mode():
            predictions = ann(images.to(device_of(ann))).argmax(1).cpu()
        correct.append((predictions == labels.cpu()).sum().item())
        yield images, labels


def simulate(converted: Converted, batches, T: int | None = None, *, coding: str = "direct",
             engine: str | Backend | Auto = "auto", device=None, seed: int = 0,
             batch_size: int | None = None, sub_batch="auto", chunk="auto", channels_last="auto",
             max_memory_mb: float | None = None, mac_pj: float = MAC_PJ,
             ac_pj: float = AC_PJ, dataset: str = "", ann_accuracy: float | None = None, progress=None) -> Result:
    """Simulate the converted network for T steps (None: the T it was converted for) on every (images, labels)
    batch of `batches` (any iterable, read once), with the ANN scored on the same images unless its
    `ann_accuracy` there is given. One simulation gives the accuracy at every t <= T. `engine`: a name of
    conf/engine (auto, torch, int8, triton, reference) or an engine object (snnbench.simulation.engines.int8.Int8(
    min_depth=0)). The other arguments are conf/sim's (`coding`: direct | poisson; `batch_size`: the images per
    batch, None: the first batch's; the speed knobs) and the energy per MAC and per synaptic operation
    in picojoules; `dataset` names the images in the tables; `progress` is called with the number of images of
    each batch simulated."""
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
    sim = SimpleNamespace(sub_batch=sub_batch,
                          batch_size=batch_size or len(sample), chunk=chunk, T=T, max_memory_mb=max_memory_mb,
                          channels_last=channels_last)
    settings = engine_settings(engines.resolve(engine, device), sim, snn, sample, device)
    check_simulation_memory(snn, sample, T, settings.sub_batch, settings.chunk, device)
    log.info("simulating %s for T=%d (%s coding, %s)", converted.method.name, T, coding, settings.describe())
    batches, ann_correct = chain([first], batches), []
    if ann_accuracy is None:
        batches = _scoring_ann(converted.ann, batches, ann_correct)
    result = simulate_network(snn, batches, T, settings.chunk, coding, device, seed, progress=progress,
                              layout=settings.layout, sub_batch=settings.sub_batch, engine=settings.engine)
    if ann_accuracy is None:
        ann_accuracy = sum(ann_correct) / max(result.num_images, 1)
    conversion = converted.conversion
    counts = counts_of(result, conversion.fan_out, ann_accuracy)
    accuracy, layers = tabulate(counts, conversion.calibration, snn, conversion.diagnostics, T,
                                method=converted.method.name, dataset=dataset, model=converted.model,
                                analog=converted.analog)
    summary = {"ann_accuracy": ann_accuracy, "snn_accuracy": float(accuracy.accuracy.iloc[-1]), "T": T,
               "method": converted.method.name, "dataset": dataset, "model": converted.model,
               "num_test_images": result.num_images, "coding": coding, "device": str(device),
               "engine": settings.engine.name, "engine_options": engines.config_of(settings.engine),
               "sub_batch": settings.sub_batch, "chunk": settings.chunk,
               "blocks_at_once": settings.blocks, "channels_last": settings.layout == torch.channels_last,
               **costs(accuracy, converted.macs, coding, mac_pj, ac_pj, converted.analog, counts)}
    return Result(accuracy, layers, summary, counts)
