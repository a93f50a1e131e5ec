"""Exporters: what a run's `export` config group names (conf/export/*.yaml; none by default, several with
`export=[snn,...]`). Each is an object its `_target_` builds from the YAML's other keys, called once the run's
results are computed with what the run produced (RunProducts); it writes its own file(s) into the run folder
through snnbench.io.files, so that no reader sees half a file. A new exporter is one module plus one YAML whose
first line is `# @package export.<name>`:

    class MyExporter:
        def __init__(self, file: str = "mine.txt"): ...
        def __call__(self, run: RunProducts) -> None: atomic_write_bytes(run.folder / self.file, ...)

snn.py holds the one snnbench ships: the converted spiking network as data (`export=[snn]`, <run>/snn.pt)."""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig

from snnbench.api import Converted
from snnbench.app.targets import instantiated
from snnbench.errors import UserError


@dataclass(frozen=True)
class RunProducts:
    """What a run produced, handed to each exporter."""
    folder: Path              # the run folder: accuracy.csv, layers.csv and counts.json are written already
    config: DictConfig        # the run's config
    converted: Converted      # the canonical ANN (.ann), its conversion (.conversion; .snn, the spiking network),
                              # the method, T and the ANN's MACs
    accuracy: pd.DataFrame    # accuracy.csv
    layers: pd.DataFrame      # layers.csv
    counts: dict              # counts.json
    summary: dict             # summary.json, written after the exporters (it marks a complete run)


Exporter = Callable[[RunProducts], None]


def build_exporters(cfg: DictConfig) -> list[Exporter]:
    """The exporters cfg's `export` group names, built before any work so that a bad one stops the run at once."""
    exporters = []
    for name, node in (cfg.get("export") or {}).items():
        exporter = instantiated(node, f"export.{name}")
        if not callable(exporter):
            raise UserError(f"export.{name}._target_={node._target_} built a {type(exporter).__name__}, which cannot "
                            "be called with the run's products: give it a __call__(self, run) method")
        exporters.append(exporter)
    return exporters
