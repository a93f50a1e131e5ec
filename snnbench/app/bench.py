"""`snnbench bench`: image-steps per second, peak memory and accuracy of the ways to simulate the same trained
network — each snnbench engine of the engine group (conf/engine/ and any hydra.searchpath folder's: torch, int8,
triton, the step-by-step reference, ...), the dense ANN forward pass x T (the floor for dense simulation) and
SpikingJelly's ann2snn converter (when installed).

Each engine lives in a process of its own, so that its memory is its own; the processes take turns, one run
at a time (`bench.warmup` untimed rounds, then `bench.repeats` timed ones, the median reported), so that a
change of load on a shared machine touches every engine alike. Peak memory: in the engine's first run, the
peak resident memory (Linux VmHWM, reset just before the run; ru_maxrss elsewhere) minus the resident memory
of the process once torch, the model and the test batches were loaded; on CUDA, torch.cuda.max_memory_allocated
minus what was allocated once loaded.
"""

import copy
import functools
import gc
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import psutil
import torch
from omegaconf import DictConfig, OmegaConf
from rich.table import Table
from torch import nn

from snnbench.app.console import console
from snnbench.app.devices import engine_folders, simulation_engine
from snnbench.app.pipeline import build_ann, canonical_ann, prepare, resolve_device
from snnbench.app.train import with_activation
from snnbench.conversion import saved
from snnbench.errors import UserError
from snnbench.io.cache import data_bytes, load_data
from snnbench.io.data import loader
from snnbench.io.files import write_csv
from snnbench.models.normalize import Normalize
from snnbench.simulation import engines
from snnbench.simulation.backend import placed, reuse_freed_memory
from snnbench.simulation.simulate import engine_settings, memory_format, simulate

log = logging.getLogger("snnbench")

PEERS = ("ann_floor", "spikingjelly")
COLUMNS = ["engine", "model", "T", "batch_size", "device", "image_steps_per_s", "peak_mem_mb", "accuracy",
           "ratio_to_floor"]


class Unsupported(Exception):
    """The engine cannot run this network or setting; the message says why."""


@dataclass
class Workload:
    """What every engine process receives: the same trained network in the forms the engines need."""
    ann: nn.Module      # the canonical ANN (BatchNorm folded): the dense floor, and SpikingJelly's input
    snn: nn.Module      # snnbench's conversion (cfg.method)
    batches: list       # [(images, labels)]: the timed test batches
    calibration: list   # training-split images, for SpikingJelly's own threshold calibration
    T: int
    sub_batch: int
    chunk: int           # steps per chunk, as the engine of the run folds them (each engine: Backend.chunk)
    channels_last: bool  # the feature maps' layout, for the snnbench engines and the floor alike
    engines: dict        # the snnbench engines measured, by name: their configs (engines.config_of)
    coding: str
    device: str
    seed: int

    @property
    def layout(self) -> torch.memory_format:  # a memory_format does not pickle: the workload keeps the flag
        return memory_format(self.channels_last, self.device)


def run_bench(cfg: DictConfig, out: Path | None) -> pd.DataFrame:
    """Prepare the network through the pipeline's stages, measure each engine in its own process, print the
    table and write `out` (CSV)."""
    for key in ("batches", "repeats"):
        if isinstance(cfg.bench[key], bool) or not isinstance(cfg.bench[key], int) or cfg.bench[key] <= 0:
            raise UserError(f"bench.{key} must be a positive integer, got {cfg.bench[key]!r}")
    if isinstance(cfg.bench.warmup, bool) or not isinstance(cfg.bench.warmup, int) or cfg.bench.warmup < 0:
        raise UserError(f"bench.warmup must be a non-negative integer, got {cfg.bench.warmup!r}")
    device = resolve_device(cfg.device)
    engine = simulation_engine(cfg.engine, device)
    found = {candidate.name: candidate for candidate in engines.candidates(engine_folders())}
    found[engine.name] = engine  # with the options the command line gave it
    names = [*found, *PEERS] if cfg.bench.engines is None else list(cfg.bench.engines)
    unknown = [name for name in names if name not in (*found, *PEERS)]
    if unknown or not names:
        raise UserError(f"bench.engines must list some of {', '.join((*found, *PEERS))} (or be null: all), got "
                        f"{names}")
    torch.manual_seed(cfg.seed)
    prepared = prepare(cfg, device)
    ann, images = prepared.ann.cpu(), prepared.calibration_images
    snn = prepared.conversion.snn.cpu()
    batches = list(loader(prepared.evaluated, cfg.sim.batch_size, limit=cfg.sim.batch_size * cfg.bench.batches))
    chosen = engine_settings(engine, cfg.sim, snn, images[0], device)  # its blocks for every engine
    work = Workload(ann, snn, batches, images, cfg.sim.T, chosen.sub_batch, chosen.chunk,
                    chosen.layout == torch.channels_last,
                    {name: engines.config_of(found[name]) for name in names if name in found}, cfg.sim.coding,
                    device, cfg.seed)
    setting = chosen.describe()
    num_images = sum(len(labels) for _, labels in batches)
    log.info("bench: %s on %s, %s, T=%d, %d images in batches of %d, %s, device %s, %d threads", cfg.model.name,
             cfg.dataset.name, cfg.method.name, cfg.sim.T, num_images, cfg.sim.batch_size, setting, device,
             torch.get_num_threads())
    with tempfile.TemporaryDirectory(prefix="snnbench-bench-") as folder:
        path = Path(folder) / "workload.pt"
        path.write_bytes(data_bytes(_workload_data(work, cfg, prepared.conversion)))
        results = _measure_alternating(names, path, cfg.bench.warmup, cfg.bench.repeats)
    frame = _tabulate(results, cfg, device, num_images)
    show_bench(frame, results, cfg, setting, num_images, engine.name)
    if out is not None:
        write_csv(out, frame)
        log.info("bench: wrote %s", out)
    return frame


def _workload_data(work: Workload, cfg: DictConfig, conversion) -> dict:
    """`work` as data (tensors and plain values) for the engines' processes, which rebuild its networks from
    snnbench's code (_read_workload): no process unpickles a module."""
    return {"config": {key: OmegaConf.to_container(cfg[key], resolve=True)
                       for key in ("model", "dataset", "train", "convert")},
            "ann": work.ann.state_dict(), "conversion": saved.as_data(conversion),
            **{key: value for key, value in vars(work).items() if key not in ("ann", "snn")}}


def _read_workload(path: Path) -> Workload:
    data = load_data(path)
    cfg = OmegaConf.create(data.pop("config"))
    ann = canonical_ann(cfg, with_activation(build_ann(cfg), cfg.train))
    ann.load_state_dict(data.pop("ann"), strict=True)
    return Workload(ann=ann, snn=saved.rebuilt(data.pop("conversion"), ann).snn, **data)


def _measure_alternating(engines: list[str], workload: Path, warmup: int, repeats: int) -> dict:
    """Start one process per engine, then run the engines in turn, one run at a time (`warmup` untimed rounds,
    then `repeats` timed ones), so that a load change on a shared machine touches every engine alike. Per
    engine: the median run of its fastest mode, that mode's peak memory and its correct counts."""
    processes = {engine: _start(engine, workload) for engine in engines}
    try:
        results = {engine: _receive(process) for engine, process in processes.items()}
        runs = {engine: {mode: [] for mode in result.get("modes", ())} for engine, result in results.items()}
        for round_ in range(warmup + repeats):
            log.info("bench: %s run %d of %d", "warm-up" if round_ < warmup else "timed", round_ + 1,
                     warmup + repeats)
            for engine, modes in runs.items():
                for mode, measured in modes.items():
                    if "status" in results[engine]:
                        break
                    processes[engine].stdin.write(mode + "\n")
                    processes[engine].stdin.flush()
                    reply = _receive(processes[engine])
                    if "status" in reply:
                        results[engine] = reply
                    else:
                        measured.append(reply)
    finally:
        for process in processes.values():
            process.stdin.close()
            process.wait()
    for engine, modes in runs.items():
        if "status" in results[engine]:
            continue
        # the first run of a mode is the one that had to grow the process: later ones reuse freed memory
        summary = {mode: {"seconds": statistics.median(r["seconds"] for r in measured[warmup:]),
                          "peak_mem_mb": measured[0]["peak_mem_mb"], "correct": measured[-1]["correct"]}
                   for mode, measured in modes.items()}
        fastest = min(summary, key=lambda mode: summary[mode]["seconds"])
        results[engine] = {**summary[fastest], "mode": fastest}
        if len(summary) > 1:
            log.info("bench: %s median seconds per mode: %s", engine,
                     ", ".join(f"{mode} {m['seconds']:.2f}" for mode, m in summary.items()))
    return results


def _start(engine: str, workload: Path) -> subprocess.Popen:
    log_file = open(workload.with_name(f"{engine}.log"), "w")  # the process writes its stderr here until it ends
    return subprocess.Popen([sys.executable, "-c", "from snnbench.app.bench import worker; worker()", engine,
                             str(workload)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log_file, text=True)


def _receive(process: subprocess.Popen) -> dict:
    """The process's next message, or if it died, a status naming the last line it wrote."""
    line = process.stdout.readline()
    if line:
        return json.loads(line)
    process.wait()
    lines = [text for text in Path(process.stderr.name).read_text().splitlines() if text.strip()]
    return {"status": f"failed: {lines[-1] if lines else f'exit code {process.returncode}'}"}


def _tabulate(results: dict, cfg, device: str, num_images: int) -> pd.DataFrame:
    floor = results.get("ann_floor", {}).get("seconds")
    rows = []
    for engine, result in results.items():
        seconds = result.get("seconds")
        rows.append({"engine": engine, "model": cfg.model.name, "T": cfg.sim.T, "batch_size": cfg.sim.batch_size,
                     "device": device,
                     "image_steps_per_s": num_images * cfg.sim.T / seconds if seconds else None,
                     "peak_mem_mb": result.get("peak_mem_mb"),
                     "accuracy": result["correct"][-1] / num_images if "correct" in result else None,
                     # the engine's time in units of the dense floor's
                     "ratio_to_floor": seconds / floor if seconds and floor else None})
    return pd.DataFrame(rows, columns=COLUMNS)


def show_bench(frame: pd.DataFrame, results: dict, cfg, setting: str, num_images: int, chosen: str):
    """The rich table: speeds, ratios side by side, memory, accuracy, and which engine `engine=` chooses (`chosen`);
    and whether each snnbench engine and the reference agree at every t."""
    peer = frame.set_index("engine").image_steps_per_s.get("spikingjelly")
    table = Table(title=f"{cfg.model.name} on {cfg.dataset.name} ({cfg.method.name}): T={cfg.sim.T}, batch "
                        f"{cfg.sim.batch_size}, {num_images} images, {frame.device.iloc[0]}, "
                        f"{torch.get_num_threads()} threads, {setting}, median of {cfg.bench.repeats}")
    for column in ("engine", "image-steps/s", "time ÷ floor", "speed ÷ SJ", "peak MB", "accuracy %", "note"):
        table.add_column(column, justify="left" if column in ("engine", "note") else "right")

    def number(value, fmt):
        return "-" if value is None or pd.isna(value) else format(value, fmt)

    for row in frame.itertuples():
        result = results[row.engine]
        speedup = row.image_steps_per_s / peer if peer and not pd.isna(peer) else None
        # a status in short (its first words; in full below the table)
        note = result["status"].split(":")[0] if "status" in result else result.get("mode", "")
        table.add_row(row.engine, number(row.image_steps_per_s, ",.0f"), number(row.ratio_to_floor, ".2f"),
                      number(speedup, ".2f"), number(row.peak_mem_mb, ",.0f"),
                      number(None if pd.isna(row.accuracy) else 100 * row.accuracy, ".2f"),
                      f"{note} (engine={cfg.engine.name})" if row.engine == chosen else note)
    console.print(table)
    for engine, result in results.items():
        if "status" in result:  # in full, whatever the table's width cut off
            console.print(f"{engine}: {result['status']}", soft_wrap=True)
    reference = results.get("reference", {}).get("correct")
    for engine in results:
        if engine not in (*PEERS, "reference") and reference and "correct" in results[engine]:
            agreement = _agreement(results[engine]["correct"], reference)
            console.print(f"{engine} and the step-by-step reference: {agreement}", soft_wrap=True)


def _agreement(correct: list[int], reference: list[int]) -> str:
    """Whether an engine's correct counts at every t are the reference's, or where they differ."""
    steps = [t for t, (a, b) in enumerate(zip(correct, reference, strict=True), 1) if a != b]
    if not steps:
        return "identical correct counts at every t"
    most = max(abs(correct[t - 1] - reference[t - 1]) for t in steps)
    return (f"[bold red]DIFFERENT correct counts[/bold red] at {len(steps)} of {len(reference)} steps (t = "
            f"{steps[0]}..{steps[-1]}, at most {most} images apart)")


# ---- inside an engine's own process ----

def worker():
    """An engine's own process: `python -c '...worker()' ENGINE WORKLOAD`. It says which modes it can run (or why
    none), then runs the mode named on each line of its standard input and replies with one JSON line."""
    engine, workload = sys.argv[1:3]
    reuse_freed_memory()  # as in `snnbench` itself; every engine's process alike
    channel = os.fdopen(os.dup(1), "w")  # the replies; whatever the libraries print goes to the log instead
    os.dup2(2, 1)

    def reply(message: dict):
        channel.write(json.dumps(message) + "\n")
        channel.flush()

    work = _read_workload(Path(workload))
    try:
        peers = {"ann_floor": _ann_floor, "spikingjelly": _spikingjelly}
        modes = peers.get(engine, functools.partial(_snnbench, name=engine))(work)
    except Unsupported as err:
        reply({"status": str(err)})
        return
    cuda = torch.device(work.device).type == "cuda"
    loaded = torch.cuda.memory_allocated() if cuda else psutil.Process().memory_info().rss
    reply({"modes": list(modes)})
    for line in sys.stdin:
        reply(_run_once(modes[line.strip()], cuda, loaded))


def _run_once(run, cuda: bool, loaded: int) -> dict:
    """Seconds of one run, its correct counts, and its peak memory beyond what the process held once loaded."""
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        _reset_peak_rss()
    start = time.perf_counter()
    correct = run()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if cuda else _peak_rss()
    return {"seconds": seconds, "correct": correct, "peak_mem_mb": (peak - loaded) / 2**20}


def _reset_peak_rss():
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: the peak resident set restarts from now
    except OSError:
        pass


def _peak_rss() -> int:
    """Peak resident memory of this process in bytes: VmHWM (Linux), else ru_maxrss (since the start)."""
    try:
        status = Path("/proc/self/status").read_text().splitlines()
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def _snnbench(work: Workload, name: str) -> dict:
    """The snnbench engine called `name`, in the blocks of images and steps of the engine the run chose."""
    engine = engines.build_engine(work.engines[name])
    reason = engine.unavailable(work.device)
    if reason:
        raise Unsupported(f"unavailable: {reason}")
    chunk = engine.chunk(work.chunk)

    def run():
        result = simulate(work.snn, work.batches, work.T, chunk, work.coding, work.device, work.seed,
                          layout=work.layout, sub_batch=work.sub_batch, engine=engine)
        return result.correct.tolist()
    blocks = engine.blocks_at_once(work.device)
    return {f"{work.sub_batch} x {chunk}" + (f", {blocks} at once" if blocks > 1 else ""): run}


def _ann_floor(work: Workload) -> dict:
    model = work.ann.eval().to(work.device, memory_format=work.layout)

    @torch.inference_mode()
    def run():
        correct = 0
        for images, labels in work.batches:
            images = placed(images, work.device, work.layout)
            for _ in range(work.T):
                logits = model(images)
            correct += (logits.argmax(1).cpu() == labels).sum().item()
        return [correct]
    return {"ANN forward x T": run}


def _spikingjelly(work: Workload) -> dict:
    """SpikingJelly's ann2snn on the same trained ANN: RateCodingRecipe (robust 99.9 % thresholds on the same
    calibration images), simulated like its examples, one step at a time and in its multi-step mode."""
    try:
        from spikingjelly.activation_based import ann2snn, functional
    except ImportError as err:
        raise Unsupported("not installed: pip install -e '.[peers]'") from err
    if work.coding != "direct":
        raise Unsupported("simulated with direct coding only, as in its examples")
    # its step-mode graph refuses the arithmetic of our input normalisation: normalise the images beforehand
    ann = copy.deepcopy(work.ann)
    normalize = [name for name, module in ann.named_modules() if isinstance(module, Normalize)]
    prepare = ann.get_submodule(normalize[0]) if normalize else nn.Identity()
    for name in normalize[:1]:
        parent, _, child = name.rpartition(".")
        setattr(ann.get_submodule(parent) if parent else ann, child, nn.Identity())
    with torch.inference_mode():
        calibration = [prepare(images) for images in work.calibration]
        batches = [(prepare(images).to(work.device), labels) for images, labels in work.batches]
    try:
        net = ann2snn.Converter(ann2snn.RateCodingRecipe(calibration, mode="99.9%"), device=work.device).convert(ann)
    except Exception as err:
        raise Unsupported(f"unsupported: {str(err).splitlines()[0]}") from err

    @torch.inference_mode()
    def simulate_sj(mode: str):
        functional.set_step_mode(net, mode)
        correct = 0
        for images, labels in batches:
            functional.reset_net(net)
            total = 0
            if mode == "s":
                for _ in range(work.T):
                    total = total + net(images)
            else:
                for start in range(0, work.T, work.chunk):
                    steps = min(work.chunk, work.T - start)
                    total = total + net(images.expand(steps, *images.shape)).sum(0)
            correct += (total.argmax(1).cpu() == labels).sum().item()
        return [correct]

    modes = {"single-step": lambda: simulate_sj("s")}
    try:  # its multi-step mode, where the converted graph supports it: a one-step probe
        functional.set_step_mode(net, "m")
        with torch.inference_mode():
            net(batches[0][0][:1].unsqueeze(0))
        functional.reset_net(net)
        modes[f"multi-step, chunk {work.chunk}"] = lambda: simulate_sj("m")
    except Exception as err:
        log.info("spikingjelly's multi-step mode fails on this network (%s)", err)
    return modes
