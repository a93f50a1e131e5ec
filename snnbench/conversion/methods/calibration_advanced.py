"""Li et al.'s advanced calibration: snnbench.conversion.methods.calibration with potential correction in place of bias
correction (conf/method/calibration_advanced.yaml), under its own name in run folders and reports."""

from snnbench.conversion.methods.calibration import convert, validate

__all__ = ["convert", "validate"]
