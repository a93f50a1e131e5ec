"""Burst spikes (Li & Zeng 2022): AugMapping with the knobs of conf/method/burst.yaml, under its own name in run
folders and reports."""

from dataclasses import dataclass
from typing import ClassVar

from snnbench.conversion.methods.augmapping import AugMapping, convert, validate

__all__ = ["Burst", "convert", "validate"]


@dataclass(frozen=True)
class Burst(AugMapping):
    name: ClassVar[str] = "burst"
    c_max: int | None = 2              # Gamma
    v0: float = 0.0
    neg_threshold: float | None = None
    threshold_scale: float = 1.0
