"""TerMapping: the baseline's thresholds plus a negative spike (double threshold) that undoes over-firing."""

from dataclasses import dataclass
from typing import ClassVar

from snnbench.conversion.methods import Method, check_flag, check_number, converted, spiking_copy
from snnbench.core.calibrate import neuron_maxima


@dataclass(frozen=True)
class TerMapping(Method):
    name: ClassVar[str] = "termapping"
    v0: float = 0.0
    neg_threshold: float = 1.0         # negative spike when V <= -neg_threshold x threshold
    require_positive_net: bool = True  # only while the neuron's net emitted count is positive
    per_neuron: bool = False           # one threshold per neuron: its largest calibration activation


def validate(knobs):
    check_number(knobs, "v0", example=0.0)
    check_number(knobs, "neg_threshold", positive=True, example=1.0)
    check_flag(knobs, "require_positive_net")
    check_flag(knobs, "per_neuron")


def convert(ann, calibration, cfg, batches):
    knobs = cfg.method
    snn = spiking_copy(ann, thresholds(ann, calibration, knobs, batches), v0=knobs.v0, c_max=1,
                       neg_threshold=knobs.neg_threshold, require_positive_net=knobs.require_positive_net)
    return converted(ann, calibration, snn)


def thresholds(ann, calibration, knobs, batches) -> dict:
    """The calibrated thresholds, or with `per_neuron` each neuron's own: its largest activation on the
    calibration images (the neuron-wise thresholds of Wang et al. 2022's signed neurons with memory)."""
    return neuron_maxima(ann, batches) if knobs.per_neuron else calibration.thresholds
