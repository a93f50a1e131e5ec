"""Threshold balancing: binary IF neurons with the calibrated percentile thresholds."""

from snnbench.methods import spiking_copy


def convert(ann, calibration, cfg, batches):
    return spiking_copy(ann, calibration.thresholds, v0=cfg.method.v0)
