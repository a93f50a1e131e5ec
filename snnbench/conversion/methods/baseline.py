"""Threshold balancing: binary IF neurons with the calibrated percentile thresholds."""

from dataclasses import dataclass
from typing import ClassVar

from snnbench.conversion.methods import Method, check_number, converted, spiking_copy


@dataclass(frozen=True)
class Baseline(Method):
    name: ClassVar[str] = "baseline"
    v0: float = 0.0            # initial membrane potential, in units of the threshold


def validate(knobs):
    check_number(knobs, "v0", example=0.5)


def convert(ann, calibration, cfg, batches):
    return converted(ann, calibration, spiking_copy(ann, calibration.thresholds, v0=cfg.method.v0))
