"""TerMapping: the baseline's thresholds plus a negative spike (double threshold) that undoes over-firing."""

from snnbench.methods import spiking_copy


def convert(ann, calibration, cfg, batches):
    knobs = cfg.method
    return spiking_copy(ann, calibration.thresholds, v0=knobs.v0, c_max=1, neg_threshold=knobs.neg_threshold,
                        require_positive_net=knobs.require_positive_net)
