"""Signed neurons with memory (Wang et al. 2022): snnbench.methods.termapping with neuron-wise thresholds
(conf/method/snm.yaml), under its own name in run folders and reports."""

from snnbench.methods.termapping import convert, validate

__all__ = ["convert", "validate"]
