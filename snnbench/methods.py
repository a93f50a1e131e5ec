"""The conversion methods as typed objects, for snnbench.convert: `snnbench.methods.AugMapping(c_max=2)`. Each is
a frozen dataclass whose fields are the knobs of conf/method/<name>.yaml, with the same defaults; a bad value
raises snnbench.errors.UserError when the object is made. The classes live beside each method's conversion, in
snnbench.conversion.methods."""

from snnbench.conversion.methods import Method, available, method_class
from snnbench.conversion.methods.augmapping import AugMapping
from snnbench.conversion.methods.baseline import Baseline
from snnbench.conversion.methods.burst import Burst
from snnbench.conversion.methods.calibration import Calibration
from snnbench.conversion.methods.calibration_advanced import CalibrationAdvanced
from snnbench.conversion.methods.ecmt import ECMT
from snnbench.conversion.methods.qcfs import QCFS
from snnbench.conversion.methods.snm import SNM
from snnbench.conversion.methods.termapping import TerMapping
from snnbench.conversion.methods.ttrbr import TTRBR

__all__ = ["ECMT", "QCFS", "SNM", "TTRBR", "AugMapping", "Baseline", "Burst", "Calibration", "CalibrationAdvanced",
           "Method", "TerMapping", "available", "method_class"]
