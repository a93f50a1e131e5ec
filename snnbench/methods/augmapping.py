"""AugMapping: augmented spikes (one event per step carrying an integer coefficient) with the double
threshold; the threshold sets the resolution, not the range, so it is scaled by `threshold_scale`."""

from snnbench.methods import spiking_copy


def convert(ann, calibration, cfg, batches):
    knobs = cfg.method
    return spiking_copy(ann, calibration.thresholds, scale=knobs.threshold_scale, v0=knobs.v0,
                        c_max=knobs.c_max, neg_threshold=knobs.neg_threshold,
                        require_positive_net=knobs.require_positive_net)
