"""ECMT (Huang et al., "Towards High-performance Spiking Transformers from ANN to SNN Conversion", ACM MM 2024):
expectation compensation for the nonlinear modules (convert.nonlinear=compensate: LayerNorm, GELU, softmax as
analog operators on the running mean of their inputs; the products of spike trains of attention as
SpikeProducts) and multi-threshold neurons at the inputs of every weight layer and every attention product, so
that every multiply-accumulate with weights or between activations is driven by spikes.

ECMT's multi-threshold neuron emits at most one spike a step, of one of the levels threshold x 2^k, k = 0 ..
levels-1 (its membrane rounded to the largest level it reaches within half a threshold). snnbench's augmented
neuron carries the same range in one event: an integer coefficient c <= c_max = 2^(levels-1) times the
threshold (every integer, not only powers of two), reset by subtraction. The threshold is the smallest level: the
`percentile` of each layer's activations on the calibration images (ECMT's 99 %), except after a softmax, whose
outputs (at most 1) are re-encoded with the fixed `softmax_threshold` (ECMT's 0.0125). The spiking layers that
re-encode analog outputs are signed (a positive and a negative spike, truncating); the ReLU layers of a network
round (v0 = 0.5), as ECMT's neuron does."""

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from snnbench.conversion.methods import Method, check_number, check_positive_int, converted, spiking_copy
from snnbench.core.analog import Analog, Reencode
from snnbench.core.calibrate import calibrate
from snnbench.core.graph import device_of
from snnbench.errors import UserError

SOFTMAX = (F.softmax, torch.softmax, "softmax")


@dataclass(frozen=True)
class ECMT(Method):
    name: str = "ecmt"
    levels: int = 8                   # thresholds per neuron, threshold x 2^k (k < levels): c_max = 2^(levels-1)
    percentile: float = 99.0          # of each layer's activations: its threshold (the smallest level)
    softmax_threshold: float = 0.0125  # the threshold of the neurons re-encoding a softmax's output

    needs_analog_operators: ClassVar[bool] = True

    def validate(self):
        check_positive_int("levels", self.levels, example=8)
        check_number("percentile", self.percentile, positive=True, example=99.0)
        if self.percentile > 100:
            raise UserError(f"method.percentile must be in (0, 100], got {self.percentile!r}: e.g. 99.0")
        check_number("softmax_threshold", self.softmax_threshold, positive=True, example=0.0125)

    def convert(self, ann, calibration, batches, context):
        calibration = calibrate(ann, batches, self.percentile, False, device_of(ann), context.seed)
        thresholds = dict(calibration.thresholds)
        for name in softmax_encoders(ann):
            thresholds[name] = torch.tensor(self.softmax_threshold)
        calibration = dataclasses.replace(calibration, thresholds=thresholds)
        snn = spiking_copy(ann, thresholds, v0=0.5, c_max=2 ** (self.levels - 1))
        return converted(ann, calibration, snn)


def softmax_encoders(ann: nn.Module) -> set[str]:
    """The spiking layers of a canonical network that re-encode a softmax's output (attention weights)."""
    modules = dict(ann.named_modules())
    found = set()
    for node in ann.graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], Reencode):
            continue
        source = node.args[0]
        analog = modules.get(source.target) if source.op == "call_module" else None
        if isinstance(analog, Analog) and (analog.function in SOFTMAX or isinstance(analog.function, nn.Softmax)):
            found.add(node.target)
    return found
