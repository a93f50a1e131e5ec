"""Li et al.'s advanced calibration: snnbench.conversion.methods.calibration with potential correction in place of bias
correction (conf/method/calibration_advanced.yaml), under its own name in run folders and reports."""

from dataclasses import dataclass
from typing import ClassVar

from snnbench.conversion.methods.calibration import Calibration, convert, validate

__all__ = ["CalibrationAdvanced", "convert", "validate"]


@dataclass(frozen=True)
class CalibrationAdvanced(Calibration):
    name: ClassVar[str] = "calibration_advanced"
    bias_correction: bool = False
    potential_correction: bool = True
