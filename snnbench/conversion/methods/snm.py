"""Signed neurons with memory (Wang et al. 2022): snnbench.conversion.methods.termapping with neuron-wise thresholds
(conf/method/snm.yaml), under its own name in run folders and reports."""

from dataclasses import dataclass
from typing import ClassVar

from snnbench.conversion.methods.termapping import TerMapping, convert, validate

__all__ = ["SNM", "convert", "validate"]


@dataclass(frozen=True)
class SNM(TerMapping):
    name: ClassVar[str] = "snm"
    per_neuron: bool = True
