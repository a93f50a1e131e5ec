"""Check that two run folders hold the same result: counts.json identical, and accuracy.csv and layers.csv with the
same columns and rows, integer and text columns equal, float columns equal to a relative 1e-12.

    python scripts/compare_runs.py MERGED_RUN UNSHARDED_RUN     # e.g. <sweep>/merged/0_baseline and a plain run

Prints the largest difference of each file; exit status 1 when they differ, 2 on a missing file."""

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

RELATIVE_TOLERANCE = 1e-12


def compare_table(a: pd.DataFrame, b: pd.DataFrame) -> tuple[list[str], float]:
    """The reasons two tables differ, and the largest relative difference of their float columns."""
    if list(a.columns) != list(b.columns) or len(a) != len(b):
        return [f"columns or rows differ: {list(a.columns)} x {len(a)} against {list(b.columns)} x {len(b)}"], 0.0
    problems, largest = [], 0.0
    for column in a.columns:
        if pd.api.types.is_float_dtype(a[column]) or pd.api.types.is_float_dtype(b[column]):
            x, y = a[column].to_numpy(float), b[column].to_numpy(float)
            relative = np.abs(x - y) / np.maximum(np.abs(y), np.finfo(float).tiny)
            largest = max(largest, float(relative.max(initial=0.0)))
            if not np.all((x == y) | (relative <= RELATIVE_TOLERANCE)):
                problems.append(f"{column} differs by up to {relative.max():.3g} (relative)")
        elif not a[column].equals(b[column]):
            problems.append(f"{column} differs")
    return problems, largest


def main(first: Path, second: Path) -> int:
    try:
        counts = [json.loads((run / "counts.json").read_text()) for run in (first, second)]
        tables = {name: [pd.read_csv(run / name) for run in (first, second)] for name in ("accuracy.csv", "layers.csv")}
    except FileNotFoundError as err:
        print(f"error: {err.filename} is missing: give two complete run folders", file=sys.stderr)
        return 2
    same = counts[0] == counts[1]
    print(f"counts.json: {'identical' if same else 'DIFFERENT'} ({counts[1]['num_images']} images)")
    for name, (a, b) in tables.items():
        problems, largest = compare_table(a, b)
        same = same and not problems
        print(f"{name}: {len(a)} rows, largest relative difference of a float column {largest:.3g}"
              + "".join(f"\n  {problem}" for problem in problems))
    print("same result" if same else "DIFFERENT results")
    return 0 if same else 1


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
