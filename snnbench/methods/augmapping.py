"""AugMapping: augmented spikes (one event per step carrying an integer coefficient) with the double
threshold; the threshold sets the resolution, not the range, so it is scaled by `threshold_scale`."""

from snnbench.methods import check_number, check_positive_int, converted, spiking_copy, termapping


def validate(knobs):
    termapping.validate(knobs)
    check_positive_int(knobs, "c_max", allow_none=True, example=4)
    check_number(knobs, "threshold_scale", positive=True, example=0.125)


def convert(ann, calibration, cfg, batches):
    knobs = cfg.method
    snn = spiking_copy(ann, calibration.thresholds, scale=knobs.threshold_scale, v0=knobs.v0,
                       c_max=knobs.c_max, neg_threshold=knobs.neg_threshold,
                       require_positive_net=knobs.require_positive_net)
    return converted(ann, calibration, snn)
