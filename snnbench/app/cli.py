"""Command line: `snnbench run` (hands its arguments to Hydra), `snnbench report`, `snnbench bench`, `snnbench list`.
Every command prints its results (tables) on stdout and its diagnostics (log lines, progress bars, errors, where
the results went) on stderr."""

import contextlib
import fcntl
import itertools
import logging
import os
import signal
import sys
import traceback
from pathlib import Path

import typer
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import OmegaConf, open_dict
from rich.table import Table

from snnbench.app import validate
from snnbench.app.console import ConsoleLog, console, results
from snnbench.app.report import FORMATS, build_report
from snnbench.app.runs import RESULTS_BEFORE_SUMMARY
from snnbench.errors import UserError
from snnbench.io.configs import CONF_DIR
from snnbench.io.files import DISK_FULL, write_json

GROUPS = ("dataset", "model", "method", "engine", "export", "experiment")
LAUNCHERS = ("basic", "joblib", "submitit_local")  # Hydra's and its plugins'; conf/hydra/launcher/ adds slurm
log = logging.getLogger("snnbench")

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="ANN-to-SNN conversion experiments: train, calibrate, convert, simulate, report.")
state = {"debug": False, "failed_jobs": [], "error": None}
held_folders = {}  # run folder -> its open lock file, held until the process ends


def options(group: str) -> list[str]:
    """The group's options, nested ones as folder/name (model=torchvision/resnet18)."""
    folder = CONF_DIR / group
    return sorted(p.relative_to(folder).with_suffix("").as_posix() for p in folder.rglob("*.yaml"))


def new_folder(path: str) -> str:
    """`path`, or else `path-2`, `path-3`, ...: the first that does not exist yet, created now. Creating a folder
    is atomic, so runs started in the same second get folders of their own (the `new_folder` resolver of
    hydra.run.dir and hydra.sweep.dir)."""
    base = Path(path)
    base.parent.mkdir(parents=True, exist_ok=True)
    for number in itertools.count(1):
        folder = base if number == 1 else base.with_name(f"{base.name}-{number}")
        try:
            folder.mkdir()
            return str(folder)
        except FileExistsError:
            continue


def claim_run_folder(subdir: str, *, _root_) -> str:
    """The `claim_run_folder` resolver of hydra.output_subdir, which Hydra resolves after it has chosen the run's
    folder and before it writes the run's config there: the one moment to refuse a folder that holds a complete
    run or a run in progress. The folder stays locked until this process ends. Returns `subdir` unchanged."""
    folder = Path(_root_.hydra.runtime.output_dir)
    if folder in held_folders:
        return subdir
    knob = "hydra.sweep.dir" if _root_.hydra.mode == RunMode.MULTIRUN else "hydra.run.dir"
    if (folder / "summary.json").exists():
        raise UserError(f"{folder} already holds a complete run (summary.json): choose another {knob} (unset, "
                        f"each run gets a new folder), or delete {folder} to run it again")
    lock = open(folder / ".lock", "a")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise UserError(f"{folder} is in use by a run in progress: choose another {knob}, or wait until that run "
                        "ends") from None
    held_folders[folder] = lock
    remove_leftovers(folder)
    return subdir


def remove_leftovers(folder: Path):
    """What a killed run (SIGKILL, a node lost) left in `folder`, which holds no summary.json: its results written
    so far, which no complete run vouches for, and its temporary files. Called with the folder's lock held, so
    no other run is writing there."""
    for name in RESULTS_BEFORE_SUMMARY:
        (folder / name).unlink(missing_ok=True)
    for temporary in folder.glob(".*.tmp"):
        temporary.unlink(missing_ok=True)


OmegaConf.register_new_resolver("new_folder", new_folder, use_cache=True)  # resolved once per config
OmegaConf.register_new_resolver("claim_run_folder", claim_run_folder)


def _task(cfg):
    """One Hydra job. In a sweep a failing job records its error and lets the others run."""
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    (run_dir / "error.json").unlink(missing_ok=True)  # from an earlier attempt in this folder
    try:
        # checked before the pipeline imports torch, which takes seconds
        validate.check_overrides(list(hydra_cfg.overrides.task), [p.name for p in CONF_DIR.iterdir() if p.is_dir()],
                                 "_target_" in cfg.model.keys())  # keys(): also a mandatory _target_ not set yet
        validate.check_values(cfg)
        from snnbench.app import pipeline

        return pipeline.run(cfg, run_dir)
    except (Exception, KeyboardInterrupt) as err:
        message = describe(err)
        with contextlib.suppress(UserError):  # a folder that cannot be written: the message says so already
            write_json(run_dir / "error.json", {"error": message, "type": type(err).__name__,
                                                "overrides": list(hydra_cfg.overrides.task)})
        if hydra_cfg.mode != RunMode.MULTIRUN:
            state["error"] = err  # run() prints it; raised here, Hydra would first print a line of its own
        elif isinstance(err, KeyboardInterrupt):
            raise  # stops the whole sweep
        else:
            log.error("job %s failed: %s", hydra_cfg.job.num, message)
            if state["debug"]:
                traceback.print_exc()
        return None


class RunFolders(Callback):
    """Hydra callback: says where a run's or a sweep's results went; after a sweep, lists the jobs that failed
    (their error.json) and remembers them."""

    def on_run_end(self, config, job_return, **kwargs):
        if state["error"] is None:
            console.print(f"results in {config.hydra.runtime.output_dir}", highlight=False, soft_wrap=True)

    def on_multirun_end(self, config, **kwargs):
        sweep = Path(config.hydra.sweep.dir)
        failed = sorted(sweep.glob("*/error.json"))
        state["failed_jobs"] = failed
        for path in failed:
            console.print(f"[red]failed:[/red] {path.parent}", highlight=False, soft_wrap=True)
        console.print(f"sweep results in {sweep} (tables and plots: snnbench report {sweep})", highlight=False,
                      soft_wrap=True)


def _causes(err: BaseException):
    """`err` and the exceptions it was raised from or while handling."""
    while err is not None:
        yield err
        err = err.__cause__ or err.__context__


def describe(err: BaseException) -> str:
    """One line naming the problem and, where we know it, the fix."""
    if isinstance(err, KeyboardInterrupt):
        return "interrupted: finished stages and training epochs are saved; rerun the same command to resume"
    # a UserError raised while Hydra resolved the config, or in a DataLoader worker, arrives wrapped
    user_error = next((e for e in _causes(err) if isinstance(e, UserError)), None)
    if user_error is not None:
        text = str(user_error)
        # a DataLoader worker's exception is re-raised with the worker's traceback: the message is its last line
        return text.rstrip().splitlines()[-1].removeprefix("snnbench.errors.UserError: ") if (
            "Original Traceback" in text) else text
    text = str(err).strip()
    cause = str(err.__cause__ or "").strip()
    if "Could not find '" in text and "Available options in" in text:
        missing = text.split("Could not find '", 1)[1].split("'", 1)[0]
        group, _, option = missing.rpartition("/")
        listed = text.split("Available options in", 1)[1].splitlines()[1:]
        valid = [line.strip() for line in listed[:next((i for i, line in enumerate(listed)
                                                          if not line.startswith("\t")), len(listed))]]
        return f"unknown {group} '{option}': choose one of {', '.join(valid)}"
    if "Could not override '" in text:
        key = text.split("'", 2)[1]
        return f"unknown config key '{key}': `snnbench run --cfg job` prints the valid keys"
    if "Could not append to config" in text:  # `+key=value` for a key the config has
        key = text.split("'", 2)[1]
        return f"config key '{key}' exists already: set it without the + ({key}=...)"
    if text.startswith("Only one of --run, --multirun, --cfg"):  # Hydra's own flags, combined
        return ("-m (a sweep), --cfg (print the config) and --info are used one at a time: drop all but one "
                "(--cfg job prints one run's config: give one option per group)")
    if type(err).__name__ == "OverrideParseException":
        return f"cannot parse the overrides ({text.splitlines()[0]}): write key=value, quoting values like 'a b'"
    if type(err).__name__ in ("ConfigCompositionException", "MissingConfigException"):
        return text.splitlines()[0] + (f" ({cause.splitlines()[0]})" if cause else "")
    # Hydra creating a run folder or writing its config or log there; snnbench's own writes raise UserErrors
    os_error = next((e for e in _causes(err) if isinstance(e, OSError) and (e.filename or e.errno in DISK_FULL)),
                    None)
    if os_error is not None and os_error.errno in DISK_FULL:
        # a write that fails (not an open) names no file: the run folder claimed last is where it went
        where = os_error.filename or next(reversed(held_folders), "the run folder")
        return (f"cannot write {where} ({os_error.strerror}): the disk is full: free space on it, or choose a "
                "folder on another disk (hydra.run.dir, hydra.sweep.dir, or run from another folder)")
    if os_error is not None:
        return (f"cannot write {os_error.filename} ({os_error.strerror}): choose a folder that can be written "
                "(hydra.run.dir, hydra.sweep.dir, or run from another folder)")
    if type(err).__module__.startswith("omegaconf"):
        return f"invalid configuration: {text.splitlines()[0]}"
    return f"internal error: {type(err).__name__}: {text.splitlines()[0] if text else ''} (--debug shows the traceback)"


def _fail(err: BaseException):
    if state["debug"]:
        traceback.print_exception(err)
    console.print(f"[bold red]error:[/bold red] {describe(err)}", highlight=False, soft_wrap=True)
    raise typer.Exit(130 if isinstance(err, KeyboardInterrupt) else 2)


@app.callback()
def main_options(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks (or SNNBENCH_DEBUG=1).")):
    state["debug"] = debug or os.environ.get("SNNBENCH_DEBUG") == "1"


def run_help() -> str:
    """`snnbench run --help`: Hydra's flags and the config groups with their options, read from conf/."""
    groups = {group: options(group) for group in (*GROUPS, "train", "calibrate", "sim")}
    groups["hydra/launcher"] = [*LAUNCHERS, *options("hydra/launcher")]
    choices = "\n".join(f"    {group + '=':<18}{', '.join(names)}" for group, names in groups.items())
    return f"""Run the pipeline (train or load the ANN -> calibrate -> convert -> simulate) as Hydra composes it from
conf/ and the command line.

\b
  snnbench run [-m] [--cfg job] [KEY=VALUE | GROUP=OPTION ...]
  -m                sweep: one job per combination of comma lists, e.g. -m method=baseline,ttrbr sim.T=8,32
  --cfg job         print the composed config (every key there is) and exit; --cfg hydra: Hydra's own
  --hydra-help      Hydra's other flags
  KEY=VALUE         set a key, e.g. sim.T=16 method.v0=0.5 dataset.root=../data (unknown keys are refused)
  GROUP=OPTION      choose a file of a config group (conf/GROUP/OPTION.yaml):
{choices}

Each run writes into a new folder, outputs/runs/<date>/<time>_<dataset>_<method>/ (a sweep into
outputs/multirun/<date>/<time>/), printed at the end; hydra.run.dir=... (hydra.sweep.dir=...) chooses it."""


@app.command(help=run_help(), context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def run(ctx: typer.Context):
    import hydra

    os.environ["HYDRA_FULL_ERROR"] = "1"  # errors reach _fail, which prints one line
    state.update(error=None, failed_jobs=[])  # of this run only, where one process runs several (tests)
    _working_directory_importable()
    hydra_main = hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")(_task)
    sys.argv = ["snnbench", *ctx.args]
    try:
        hydra_main()
    except SystemExit as exit_:
        if exit_.code not in (0, None):
            raise typer.Exit(exit_.code) from None
    except (Exception, KeyboardInterrupt) as err:
        _fail(err)
    if state["error"]:
        _fail(state["error"])
    if state["failed_jobs"]:
        console.print(f"[bold red]error:[/bold red] {len(state['failed_jobs'])} sweep job(s) failed; "
                      "their error.json says why")
        raise typer.Exit(1)


def _composed(overrides: list[str]):
    """The config composed from conf/ and `overrides`, outside a Hydra run (bench, inspect). Hydra's part of it
    is kept where a run keeps it (HydraConfig): its search path is where engines are found (app.devices)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def _working_directory_importable():
    """model._target_ may name a module in the working directory, as in Hydra apps. Appended, not put first: a
    file there named like an installed module (torch.py) must not replace it."""
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench(ctx: typer.Context,
          out: Path | None = typer.Option(None, "--out", help="Also write the table as CSV to this file.")):
    """Image-steps/s, peak memory and accuracy of the snnbench engine, the step-by-step reference, the dense ANN
    floor and SpikingJelly on the same network: snnbench bench [HYDRA OVERRIDES...] [--out FILE.csv], e.g.
    `dataset=mnist sim.T=64 bench.repeats=3` (see docs/performance.md)."""
    from snnbench.app.bench import run_bench

    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[ConsoleLog()])
    try:
        run_bench(_composed(ctx.args), out)
    except (Exception, KeyboardInterrupt) as err:
        _fail(err)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def inspect(ctx: typer.Context):
    """How snnbench reads a model, without data or training: its spiking layers (name, the call each came from,
    output shape, neurons, fan-out), what was folded, removed or replaced, or the node that stops the conversion:
    snnbench inspect [HYDRA OVERRIDES...], e.g. `model=torchvision/resnet18 dataset=cifar10 convert.maxpool=avg`."""
    from snnbench.app.console import results
    from snnbench.app.inspection import inspect_model

    _working_directory_importable()
    try:
        inspect_model(_composed(ctx.args), results)
    except (Exception, KeyboardInterrupt) as err:
        _fail(err)


@app.command("report")
def report(dirs: list[Path] = typer.Argument(..., metavar="DIR", help="Run folders, sweep folders, or any folder "
                                                                        "holding them."),
           out: Path | None = typer.Option(None, "--out", help="Where to write the report (default: the first DIR)."),
           formats: str = typer.Option("png", "--format", help=f"Plot file formats, comma-separated: "
                                                               f"{', '.join(FORMATS)}.")):
    """Merge runs into report.csv, accuracy_vs_t.csv, failed.csv and plots (accuracy_vs_t, accuracy_vs_sops,
    firing_rates: one panel per run), and print accuracy vs t per run, e.g.
    `snnbench report outputs/multirun/<date>/<time> --format png,pdf`."""
    try:
        build_report(dirs, out or dirs[0], formats.split(","))
    except (Exception, KeyboardInterrupt) as err:
        _fail(err)


@app.command("list")
def list_options():
    """Show the datasets, models, methods, simulation engines, exporters and experiment presets available."""
    table = Table(title="snnbench options (conf/)")
    table.add_column("group")
    table.add_column("options")
    for group in GROUPS:
        table.add_row(group, ", ".join(options(group)) or "-")
    results.print(table)


def _terminate(signum, frame):
    raise KeyboardInterrupt


def main():
    signal.signal(signal.SIGTERM, _terminate)
    for name in ("SNNBENCH_CACHE", "SNNBENCH_DATA"):
        if os.environ.get(name) == "":  # set but empty, as `export SNNBENCH_CACHE=` leaves it: the default
            del os.environ[name]
    app()
