"""TerMapping: the baseline's thresholds plus a negative spike (double threshold) that undoes over-firing. With
per_neuron these are Wang et al. 2022's signed neurons with memory (conf/method/snm.yaml)."""

from dataclasses import dataclass

from snnbench.conversion.methods import Method, check_flag, check_number, converted, spiking_copy
from snnbench.core.calibrate import neuron_maxima


@dataclass(frozen=True)
class TerMapping(Method):
    name: str = "termapping"
    v0: float = 0.0
    neg_threshold: float = 1.0         # negative spike when V <= -neg_threshold x threshold
    require_positive_net: bool = True  # only while the neuron's net emitted count is positive
    per_neuron: bool = False           # one threshold per neuron: its largest calibration activation

    def validate(self):
        check_number("v0", self.v0, example=0.0)
        check_number("neg_threshold", self.neg_threshold, positive=True, example=1.0)
        check_flag("require_positive_net", self.require_positive_net)
        check_flag("per_neuron", self.per_neuron)

    def convert(self, ann, calibration, batches, context):
        snn = spiking_copy(ann, thresholds(ann, calibration, self.per_neuron, batches), v0=self.v0, c_max=1,
                           neg_threshold=self.neg_threshold, require_positive_net=self.require_positive_net)
        return converted(ann, calibration, snn)


def thresholds(ann, calibration, per_neuron: bool, batches) -> dict:
    """The calibrated thresholds, or with `per_neuron` each neuron's own: its largest activation on the
    calibration images (the neuron-wise thresholds of Wang et al. 2022's signed neurons with memory)."""
    return neuron_maxima(ann, batches) if per_neuron else calibration.thresholds
