"""TerMapping: the baseline's thresholds plus a negative spike (double threshold) that undoes over-firing."""

from snnbench.methods import check_flag, check_number, converted, spiking_copy


def validate(knobs):
    check_number(knobs, "v0", example=0.0)
    check_number(knobs, "neg_threshold", positive=True, example=1.0)
    check_flag(knobs, "require_positive_net")


def convert(ann, calibration, cfg, batches):
    knobs = cfg.method
    snn = spiking_copy(ann, calibration.thresholds, v0=knobs.v0, c_max=1, neg_threshold=knobs.neg_threshold,
                       require_positive_net=knobs.require_positive_net)
    return converted(ann, calibration, snn)
