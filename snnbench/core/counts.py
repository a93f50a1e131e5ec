"""What a simulation measured, as the run's tables: the sums over its images (counts.json), the per-image numbers of
accuracy.csv and layers.csv computed from them, and the energy estimate. `snnbench run`, the merge of shards and
the Python API (snnbench.simulate) all build their tables here, so they cannot disagree."""

from typing import TYPE_CHECKING

import pandas as pd

if TYPE_CHECKING:  # `snnbench report` merges shards with per_image, without importing torch
    from torch import nn

    from snnbench.core.calibrate import Calibration

# per-operation energies, picojoules (45 nm, Horowitz 2014); conf/config.yaml's energy group holds the same
MAC_PJ = 4.6
AC_PJ = 0.9


def counts_of(result, fan: dict, ann_accuracy: float) -> dict:
    """counts.json: the sums over a simulation's images (a snnbench.simulation.backend.SimulationResult) behind
    its per-image numbers, per t (cumulative, like accuracy.csv) and per spiking layer, and where the network
    has products of spike trains per product (their synaptic operations are among the SOPs; their events are
    the spikes arriving, which the neurons that emitted them counted already). Events and spike units are
    integers, so the shards' sums add up exactly."""
    n = result.num_images
    sops = sum(result.events[name] * fan[name] for name in result.events)
    for work in result.products.values():
        sops = sops + work[1]
    products = {"products": {name: {"events": work[0].sum().item(), "synaptic_ops": work[1].sum().item(),
                                    "macs": work[2].sum().item()} for name, work in result.products.items()}}
    return {
        "num_images": n,
        "ann_correct": round(ann_accuracy * n),  # the accuracy is correct / n: rounding recovers the count
        "steps": {"correct": result.correct.tolist(),
                  "events": sum(result.events.values()).cumsum(0).tolist(),
                  "spike_units": sum(result.units.values()).cumsum(0).tolist(),
                  "sops": sops.cumsum(0).tolist()},
        "layers": {name: {"events": result.events[name].sum().item(), "spike_units": result.units[name].sum().item(),
                          "fan_out": fan[name]} for name in result.events},
        **(products if result.products else {}),
    }


def per_image(counts: dict, neurons: dict, T: int) -> tuple[dict, dict]:
    """The per-image numbers of a run, or of merged shards, from its counts: accuracy.csv's columns over t, and
    per spiking layer (`neurons` per image) and product of spike trains layers.csv's counted columns. One formula
    for both."""
    n = max(counts["num_images"], 1)
    steps = counts["steps"]
    columns = {"accuracy": [correct / n for correct in steps["correct"]],
               "events_per_image": [events / n for events in steps["events"]],
               "spike_units_per_image": [units / n for units in steps["spike_units"]],
               "sops_per_image": [sops / n for sops in steps["sops"]]}
    layers = {}
    for name, layer in counts["layers"].items():
        events = layer["events"] / n
        layers[name] = {"events_per_image": events, "spike_units_per_image": layer["spike_units"] / n,
                        "firing_rate": events / (neurons[name] * T), "sops_per_image": events * layer["fan_out"]}
    for name, work in counts.get("products", {}).items():  # products of spike trains: the spikes arriving
        layers[name] = {"events_per_image": work["events"] / n, "sops_per_image": work["synaptic_ops"] / n}
    return columns, layers


def tabulate(counts: dict, calibration: "Calibration", snn: "nn.Module", diagnostics: dict, T: int, *, method: str,
             dataset: str, model: str, analog: dict[str, int] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """accuracy.csv (one row per t, counts cumulative up to t) and layers.csv (one row per spiking layer, then one
    per product of spike trains with its events arriving and synaptic operations per image, then one per analog
    operator: `analog`, its multiply-accumulates per image and step, in `neurons`; `kind` says which) from a run's
    counts (counts_of), as a merge of shards computes them."""
    from snnbench.core.analog import ANALOG, SPIKE_PRODUCT, layer_kind  # torch: not for `snnbench report`

    columns, counted = per_image(counts, calibration.neurons, T)
    products = [{"layer": name, **counted[name], "kind": SPIKE_PRODUCT} for name in counts.get("products", {})]
    accuracy = pd.DataFrame({"method": method, "dataset": dataset, "model": model, "t": range(1, T + 1), **columns})
    layers = pd.DataFrame([{"layer": name, "neurons": calibration.neurons[name],
                            "threshold": snn.get_submodule(name).threshold.mean().item(),
                            **counted[name], **diagnostics.get(name, {}), "kind": layer_kind(snn.get_submodule(name))}
                           for name in counts["layers"]] + products
                          + [{"layer": name, "neurons": values, "kind": ANALOG}
                             for name, values in (analog or {}).items()])
    return accuracy, layers


def costs(accuracy: pd.DataFrame, macs: dict[str, int], coding: str, mac_pj: float = MAC_PJ,
          ac_pj: float = AC_PJ, analog: dict[str, int] | None = None, counts: dict | None = None) -> dict:
    """summary.json's cost entries: MACs of the ANN, events, spike units and SOPs of the SNN per image up to T, and
    their energy in microjoules. ANN = MACs x mac_pj; SNN = SOPs x ac_pj (the products of spike trains' synaptic
    operations among them), plus with direct coding the first layer's MACs x mac_pj (it multiplies the analog
    image once: its current is constant), plus the analog operators' MACs x mac_pj (`analog`: per image and step
    of each) and the products of spike trains' (their running product rescaled to a rate: in `counts`, the run's
    counts_of). The event-driven share is event_driven_share's."""
    macs_per_image = sum(macs.values())
    first_layer_macs = next(iter(macs.values())) if coding == "direct" else 0
    last = accuracy.iloc[-1]
    analog_macs = sum((analog or {}).values()) * int(last.t)
    products = (counts or {}).get("products", {})
    if products:
        analog_macs += sum(work["macs"] for work in products.values()) / max(counts["num_images"], 1)
    return {
        "macs_per_image": macs_per_image,
        "events_per_image": float(last.events_per_image),
        "spike_units_per_image": float(last.spike_units_per_image),
        "sops_per_image": float(last.sops_per_image),
        "energy_ann_uj": macs_per_image * mac_pj * 1e-6,
        "energy_snn_uj": (last.sops_per_image * ac_pj + (first_layer_macs + analog_macs) * mac_pj) * 1e-6,
        "analog_macs_per_image": analog_macs,
        "analog_fed_macs_per_image": first_layer_macs,
        "event_driven_share": event_driven_share(float(last.sops_per_image), analog_macs, first_layer_macs),
    }


def event_driven_share(sops: float, analog_macs: float, analog_fed_macs: float) -> float:
    """The share of a spiking network's operations per image driven by events: SOPs / (SOPs + the analog
    operators' MACs + the MACs of weight layers fed analog values). With direct coding the first layer is fed the
    analog image; every other weight layer is fed spikes (convert.nonlinear=compensate re-encodes analog outputs
    before weight layers)."""
    total = sops + analog_macs + analog_fed_macs
    return sops / total if total else 1.0
