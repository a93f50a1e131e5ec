"""Threshold balancing: binary IF neurons with the calibrated percentile thresholds."""

from dataclasses import dataclass

from snnbench.conversion.methods import Method, check_number, converted, spiking_copy


@dataclass(frozen=True)
class Baseline(Method):
    name: str = "baseline"
    v0: float = 0.0            # initial membrane potential, in units of the threshold

    def validate(self):
        check_number("v0", self.v0, example=0.5)

    def convert(self, ann, calibration, batches, context):
        return converted(ann, calibration, spiking_copy(ann, calibration.thresholds, v0=self.v0))
