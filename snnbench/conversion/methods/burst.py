"""Burst spikes (Li & Zeng 2022): AugMapping with the knobs of conf/method/burst.yaml, under its own name in run
folders and reports."""

from snnbench.conversion.methods.augmapping import convert, validate

__all__ = ["convert", "validate"]
