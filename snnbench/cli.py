"""Command line: `snnbench run` (hands its arguments to Hydra), `snnbench report`, `snnbench list`."""

import logging
import os
import signal
import sys
import traceback
from pathlib import Path

import typer
from hydra.experimental.callback import Callback
from rich.console import Console
from rich.table import Table

from snnbench.errors import UserError
from snnbench.report import build_report, console, write_json

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
GROUPS = ("dataset", "model", "method", "experiment")
log = logging.getLogger("snnbench")

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="ANN-to-SNN conversion experiments: train, calibrate, convert, simulate, report.")
state = {"debug": False, "failed_jobs": [], "error": None}


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _task(cfg):
    """One Hydra job. In a sweep a failing job records its error and lets the others run."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from snnbench import pipeline

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    (run_dir / "error.json").unlink(missing_ok=True)  # from an earlier attempt in this folder
    try:
        return pipeline.run(cfg, run_dir)
    except (Exception, KeyboardInterrupt) as err:
        message = describe(err)
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


class FailureSummary(Callback):
    """Hydra callback: after a sweep, list the jobs that failed (their error.json) and remember them."""

    def on_multirun_end(self, config, **kwargs):
        failed = sorted(Path(config.hydra.sweep.dir).glob("*/error.json"))
        state["failed_jobs"] = failed
        for path in failed:
            console.print(f"[red]failed:[/red] {path.parent}")


def describe(err: BaseException) -> str:
    """One line naming the problem and, where we know it, the fix."""
    if isinstance(err, KeyboardInterrupt):
        return "interrupted: finished stages and training epochs are saved; rerun the same command to resume"
    if isinstance(err, UserError):
        return str(err)
    text = str(err).strip()
    cause = str(err.__cause__ or "").strip()
    if "Could not find '" in text and "Available options in" in text:
        missing = text.split("Could not find '", 1)[1].split("'", 1)[0]
        group, _, option = missing.rpartition("/")
        listed = text.split("Available options in", 1)[1].splitlines()[1:]
        valid = [line.strip() for line in listed[:next((i for i, line in enumerate(listed)
                                                          if not line.startswith("\t")), len(listed))]]
        return f"unknown {group} '{option}': choose one of {', '.join(valid)}"
    if "Could not override '" in text or "Could not append to config" in text:
        key = text.split("'", 2)[1]
        return (f"unknown config key '{key}': `snnbench run --cfg job` prints the valid keys "
                f"(to add a new key, prefix it with +)")
    if type(err).__name__ == "OverrideParseException":
        return f"cannot parse the overrides ({text.splitlines()[0]}): write key=value, quoting values like 'a b'"
    if type(err).__name__ in ("ConfigCompositionException", "MissingConfigException"):
        return text.splitlines()[0] + (f" ({cause.splitlines()[0]})" if cause else "")
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


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def run(ctx: typer.Context):
    """Run the pipeline: snnbench run [HYDRA OVERRIDES...], e.g. `method=augmapping sim.T=16`,
    `-m method=baseline,termapping` to sweep, `--cfg job` to print the composed config."""
    import hydra

    os.environ["HYDRA_FULL_ERROR"] = "1"  # errors reach _fail, which prints one line
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


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench(ctx: typer.Context,
          out: Path | None = typer.Option(None, "--out", help="Also write the table as CSV to this file.")):
    """Image-steps/s, peak memory and accuracy of the snnbench engine, the step-by-step reference, the dense ANN
    floor and SpikingJelly on the same network: snnbench bench [HYDRA OVERRIDES...] [--out FILE.csv], e.g.
    `dataset=mnist sim.T=64 bench.repeats=3` (see docs/performance.md)."""
    from hydra import compose, initialize_config_dir
    from rich.logging import RichHandler

    from snnbench.bench import run_bench

    logging.basicConfig(level=logging.INFO, format="%(message)s",
                        handlers=[RichHandler(console=console, show_path=False)])
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="config", overrides=ctx.args)
        run_bench(cfg, out)
    except (Exception, KeyboardInterrupt) as err:
        _fail(err)


@app.command("report")
def report(dirs: list[Path] = typer.Argument(..., metavar="DIR", help="Run folders, sweep folders, or any folder "
                                                                        "holding them."),
           out: Path | None = typer.Option(None, "--out", help="Where to write the report (default: the first DIR)."),
           layers_of: Path | None = typer.Option(None, "--layers-of", help="The run whose per-layer firing rates "
                                                                           "to plot (default: the first run).")):
    """Merge runs into report.csv, accuracy_vs_t.csv/.png, accuracy_vs_sops.png, firing_rates.png and failed.csv,
    and print accuracy vs t per method, e.g. `snnbench report outputs/multirun/<date>/<time>`."""
    try:
        build_report(dirs, out or dirs[0], layers_of)
    except (Exception, KeyboardInterrupt) as err:
        _fail(err)


@app.command("list")
def list_options():
    """Show the datasets, models, methods and experiment presets available."""
    table = Table(title="snnbench options (conf/)")
    table.add_column("group")
    table.add_column("options")
    for group in GROUPS:
        table.add_row(group, ", ".join(options(group)) or "-")
    Console().print(table)


def _terminate(signum, frame):
    raise KeyboardInterrupt


def main():
    signal.signal(signal.SIGTERM, _terminate)
    app()
