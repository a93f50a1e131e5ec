"""Signed neurons with memory (Wang et al. 2022): snnbench.conversion.methods.termapping with neuron-wise thresholds
(conf/method/snm.yaml), under its own name in run folders and reports."""

from snnbench.conversion.methods.termapping import convert, validate

__all__ = ["convert", "validate"]
