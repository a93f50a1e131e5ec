"""Atomic CSV/JSON writers and terminal tables for one run."""

import io
import json
import os
import tempfile
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.table import Table

console = Console(stderr=True)


def atomic_write_bytes(path, data: bytes):
    """Write to a temporary name in the same folder, then rename: a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_csv(path, frame: pd.DataFrame):
    buffer = io.StringIO()
    frame.to_csv(buffer, index=False)
    atomic_write_bytes(path, buffer.getvalue().encode())


def write_json(path, data: dict):
    atomic_write_bytes(path, (json.dumps(data, indent=2, default=str) + "\n").encode())


def show_run(summary: dict, accuracy: pd.DataFrame):
    """ANN accuracy, SNN accuracy and events per image at a few t (powers of two and T)."""
    T = summary["T"]
    steps = sorted({t for t in (1, 2, 4, 8, 16, 32, 64, 128, 256) if t <= T} | {T})
    table = Table(title=f"{summary['method']} on {summary['dataset']} / {summary['model']}: "
                        f"ANN {100 * summary['ann_accuracy']:.2f} %")
    table.add_column("t", justify="right")
    table.add_column("SNN accuracy %", justify="right")
    table.add_column("events / image", justify="right")
    table.add_column("spike units / image", justify="right")
    rows = accuracy.set_index("t")
    for t in steps:
        row = rows.loc[t]
        table.add_row(str(t), f"{100 * row.accuracy:.2f}", f"{row.events_per_image:,.0f}",
                      f"{row.spike_units_per_image:,.0f}")
    console.print(table)
