"""AugMapping: augmented spikes (one event per step carrying an integer coefficient) with the double
threshold; the threshold sets the resolution, not the range, so it is scaled by `threshold_scale`. Without the
negative spike (neg_threshold=null) and with c_max = Gamma these are Li & Zeng 2022's burst spikes
(conf/method/burst.yaml)."""

from dataclasses import dataclass

from snnbench.conversion.methods import (
    Method,
    check_flag,
    check_number,
    check_positive_int,
    converted,
    spiking_copy,
    termapping,
)


@dataclass(frozen=True)
class AugMapping(Method):
    name: str = "augmapping"
    v0: float = 0.5
    neg_threshold: float | None = 1.0  # None: positive spikes only (burst spikes)
    require_positive_net: bool = True
    c_max: int | None = None           # largest |c| per step (None: unlimited; 1: TerMapping)
    threshold_scale: float = 0.125     # threshold = scale x calibrated threshold
    per_neuron: bool = False

    def validate(self):
        check_number("v0", self.v0, example=0.5)
        check_number("neg_threshold", self.neg_threshold, positive=True, allow_none=True, example=1.0)
        check_flag("require_positive_net", self.require_positive_net)
        check_flag("per_neuron", self.per_neuron)
        check_positive_int("c_max", self.c_max, allow_none=True, example=4)
        check_number("threshold_scale", self.threshold_scale, positive=True, example=0.125)

    def convert(self, ann, calibration, batches, context):
        snn = spiking_copy(ann, termapping.thresholds(ann, calibration, self.per_neuron, batches),
                           scale=self.threshold_scale, v0=self.v0, c_max=self.c_max,
                           neg_threshold=self.neg_threshold, require_positive_net=self.require_positive_net)
        return converted(ann, calibration, snn)
