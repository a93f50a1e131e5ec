"""One evaluation split into jobs: `sim.num_shards=N sim.shard=i` simulates the i-th of N disjoint, seeded parts of
the evaluated images; every run records the sums behind its per-image numbers (counts.json), and `snnbench report`
merges the complete shards of a run from those sums into the accuracy.csv, layers.csv and summary.json that one
unsharded run writes."""

import json
import shutil
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf

from snnbench.app.runs import FAILED_COLUMNS, read_overrides, run_status
from snnbench.core.counts import event_driven_share, per_image
from snnbench.errors import UserError
from snnbench.io.files import atomic_write_bytes, write_csv, write_json

SHARD_KEYS = ("sim.shard", "sim.num_shards")
# the layers.csv columns computed from the counts; the others (neurons, threshold, a method's diagnostics) come
# from the conversion, which every shard of a run repeats identically
COUNTED_LAYER_COLUMNS = ("events_per_image", "spike_units_per_image", "firing_rate", "sops_per_image")
# summary.json entries that must agree between the shards of one run
SHARED_SUMMARY_KEYS = ("method", "dataset", "model", "T", "split", "coding", "macs_per_image", "checkpoint_sha256")


def check_shard(shard, num_shards):
    if isinstance(num_shards, bool) or not isinstance(num_shards, int) or num_shards <= 0:
        raise UserError(f"sim.num_shards must be a positive integer, got {num_shards!r}: e.g. sim.num_shards=4")
    if isinstance(shard, bool) or not isinstance(shard, int) or not 0 <= shard < num_shards:
        raise UserError(f"sim.shard must be an integer from 0 to sim.num_shards - 1 = {num_shards - 1}, got "
                        f"{shard!r}: run the shards as `-m sim.shard=range(0,{num_shards})`")


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def sharding(run: Path) -> tuple[int, int]:
    """(shard, num_shards) of a run folder: what its summary.json records, or for a run that did not finish what
    its composed config (.hydra/config.yaml) asked for; (0, 1) when it is not a shard."""
    if run_status(run) == "complete":
        summary = _read_json(run / "summary.json")
        return summary.get("shard", 0), summary.get("num_shards", 1)
    config = run / ".hydra" / "config.yaml"
    sim = OmegaConf.load(config).get("sim", {}) if config.exists() else {}
    return sim.get("shard", 0), sim.get("num_shards", 1)


def _describe(overrides: tuple) -> str:
    return " ".join(f"{key}={value}" for key, value in overrides) or "no overrides"


def merge_shards(runs: list[Path], out) -> tuple[list[Path], pd.DataFrame]:
    """The runs of a report with each complete set of shards (the same overrides but sim.shard, one complete run
    of each shard) replaced by one run folder under out/merged/ that holds what the unsharded run writes. The shards
    of an incomplete set stay out of the tables: returned are also the rows for failed.csv that name the missing
    shards and the complete ones left unmerged (failed and unfinished shards stay in the runs: the report lists
    them with their own error)."""
    merged_root = Path(out) / "merged"
    earlier = [run for run in runs if run.parent == merged_root]
    for run in earlier:  # merges of an earlier report: rebuilt below, or gone when a shard went missing since
        shutil.rmtree(run)
    runs = [run for run in runs if run not in earlier]
    sets = {}
    for run in runs:
        shard, num_shards = sharding(run)
        if num_shards > 1 and 0 <= shard < num_shards:
            overrides = tuple(sorted((key, value) for key, value in read_overrides(run).items() if key != "sim.shard"))
            sets.setdefault((num_shards, overrides), {}).setdefault(shard, []).append(run)
    in_place, problems, names = {}, [], set()
    for (num_shards, overrides), found in sets.items():
        complete = {shard: [run for run in copies if run_status(run) == "complete"] for shard, copies in found.items()}
        missing = [shard for shard in range(num_shards) if shard not in found]
        unfinished = [shard for shard, copies in complete.items() if not copies]
        twice = [shard for shard, copies in complete.items() if len(copies) > 1]
        runs_of_set = [copies[0] for _, copies in sorted(complete.items()) if len(copies) == 1]
        reasons = ([f"shard {shard} missing" for shard in missing] +
                   [f"shard {shard} failed or unfinished" for shard in unfinished] +
                   [f"shard {shard} complete twice ({', '.join(map(str, complete[shard]))})" for shard in twice])
        if not reasons:
            reasons = mismatches(runs_of_set)
        if not reasons:
            name, copy = runs_of_set[0].name, 1
            while name in names:  # shard 0 of another set had the same folder name (in another sweep)
                copy += 1
                name = f"{runs_of_set[0].name}_{copy}"
            names.add(name)
            in_place[runs_of_set[0]] = merge(runs_of_set, merged_root / name)
            continue
        where = str(next(iter(found.values()))[0].parent)
        problems += [{"run": where, "status": "missing",
                      "error": f"sim.shard={shard} of sim.num_shards={num_shards} ({_describe(overrides)}): no run "
                               f"folder, so the other shards are not merged: run it with sim.shard={shard}",
                      **dict(overrides), "sim.shard": str(shard)} for shard in missing]
        problems += [{"run": str(run), "status": "unmerged",
                      "error": f"shard {shard} of {num_shards} is complete, but {'; '.join(reasons)}: its shards "
                               f"are not merged", **dict(overrides), "sim.shard": str(shard)}
                     for shard, copies in sorted(complete.items()) for run in copies]
    sharded = {run for found in sets.values() for copies in found.values() for run in copies
               if run_status(run) == "complete"}
    kept = [in_place.get(run, run) for run in runs if run in in_place or run not in sharded]
    return kept, pd.DataFrame(problems) if problems else pd.DataFrame(columns=FAILED_COLUMNS)


def mismatches(shards: list[Path]) -> list[str]:
    """Why these complete shards cannot be merged: a missing counts.json, or a conversion or setting that differs
    from shard 0's (another checkpoint, T or device that converted differently)."""
    reasons = [f"{run} has no counts.json" for run in shards if not (run / "counts.json").exists()]
    first, first_layers = _read_json(shards[0] / "summary.json"), pd.read_csv(shards[0] / "layers.csv")
    static = [column for column in first_layers.columns if column not in COUNTED_LAYER_COLUMNS]
    for run in shards[1:]:
        summary, layers = _read_json(run / "summary.json"), pd.read_csv(run / "layers.csv")
        differ = [key for key in SHARED_SUMMARY_KEYS if summary.get(key) != first.get(key)]
        if list(layers.columns) != list(first_layers.columns) or not layers[static].equals(first_layers[static]):
            differ.append("layers.csv (" + ", ".join(static) + ")")
        if differ:
            reasons.append(f"{run} differs from shard 0 in {', '.join(differ)}")
    return reasons


def merge(shards: list[Path], target: Path) -> Path:
    """Write into `target` the run that the complete `shards` (in shard order) make together: every per-image number
    from the summed counts, as the unsharded run computes it."""
    counts = [_read_json(run / "counts.json") for run in shards]
    summaries = [_read_json(run / "summary.json") for run in shards]
    n = sum(count["num_images"] for count in counts)
    steps = {key: [sum(values) for values in zip(*(count["steps"][key] for count in counts), strict=True)]
             for key in counts[0]["steps"]}
    totals = {name: {key: sum(count["layers"][name][key] for count in counts) for key in ("events", "spike_units")}
              for name in counts[0]["layers"]}
    fan = {name: layer["fan_out"] for name, layer in counts[0]["layers"].items()}
    merged_counts = {"num_images": n, "ann_correct": sum(count["ann_correct"] for count in counts), "steps": steps,
                     "layers": {name: {**totals[name], "fan_out": fan[name]} for name in totals}}
    if "products" in counts[0]:  # products of spike trains (convert.nonlinear=compensate)
        merged_counts["products"] = {name: {key: sum(count["products"][name][key] for count in counts)
                                            for key in work} for name, work in counts[0]["products"].items()}

    layers = pd.read_csv(shards[0] / "layers.csv")
    columns, counted = per_image(merged_counts, dict(zip(layers.layer, layers.neurons, strict=True)),
                                 summaries[0]["T"])
    accuracy = pd.read_csv(shards[0] / "accuracy.csv")[["method", "dataset", "model", "t"]].assign(**columns)
    for column in COUNTED_LAYER_COLUMNS:
        layers[column] = [counted[name].get(column) if name in counted else None  # analog operators: no spikes
                          for name in layers.layer]

    last = accuracy.iloc[-1]
    summary = {
        **summaries[0],
        "ann_accuracy": sum(count["ann_correct"] for count in counts) / n, "snn_accuracy": float(last.accuracy),
        "num_test_images": n, "shard": 0, "num_shards": 1,
        "events_per_image": float(last.events_per_image), "spike_units_per_image": float(last.spike_units_per_image),
        "sops_per_image": float(last.sops_per_image),
        # affine in SOPs per image, so the image-weighted mean of the shards' energies is the whole run's
        "energy_snn_uj": sum(s["energy_snn_uj"] * c["num_images"] for s, c in zip(summaries, counts, strict=True)) / n,
        **({"event_driven_share": event_driven_share(float(last.sops_per_image), summaries[0]["analog_macs_per_image"],
                                                     summaries[0]["analog_fed_macs_per_image"])}
           if "event_driven_share" in summaries[0] else {}),  # not in runs made before it was reported
        # the time every shard spent: what the run cost in all
        **{key: round(sum(s[key] for s in summaries), 3) for key in summaries[0] if key.startswith("time_")},
        "merged_from": [str(run) for run in shards],
    }
    (target / "summary.json").unlink(missing_ok=True)  # written last: it marks the merge complete
    overrides = [item for item in OmegaConf.to_container(OmegaConf.load(shards[0] / ".hydra" / "overrides.yaml"))
                 if str(item).partition("=")[0].lstrip("+~") not in SHARD_KEYS]
    atomic_write_bytes(target / ".hydra" / "overrides.yaml", OmegaConf.to_yaml(overrides).encode())
    write_csv(target / "accuracy.csv", accuracy)
    write_csv(target / "layers.csv", layers)
    write_json(target / "counts.json", merged_counts)
    write_json(target / "summary.json", summary)
    return target
