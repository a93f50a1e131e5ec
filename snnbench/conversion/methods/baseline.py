"""Threshold balancing: binary IF neurons with the calibrated percentile thresholds."""

from snnbench.conversion.methods import check_number, converted, spiking_copy


def validate(knobs):
    check_number(knobs, "v0", example=0.5)


def convert(ann, calibration, cfg, batches):
    return converted(ann, calibration, spiking_copy(ann, calibration.thresholds, v0=cfg.method.v0))
