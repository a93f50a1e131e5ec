"""Burst spikes (Li & Zeng 2022): snnbench.methods.augmapping with the knobs of conf/method/burst.yaml, under its
own name in run folders and reports."""

from snnbench.methods.augmapping import convert, validate

__all__ = ["convert", "validate"]
