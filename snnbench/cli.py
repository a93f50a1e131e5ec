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
from snnbench.report import console, write_json

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
GROUPS = ("dataset", "model", "method", "experiment")
log = logging.getLogger("snnbench")

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="ANN-to-SNN conversion experiments: train, calibrate, convert, simulate, report.")
state = {"debug": False, "failed_jobs": []}


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _task(cfg):
    """One Hydra job. In a sweep a failing job records its error and lets the others run."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from snnbench import pipeline

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        return pipeline.run(cfg, run_dir)
    except (Exception, KeyboardInterrupt) as err:
        message = describe(err)
        write_json(run_dir / "error.json", {"error": message, "type": type(err).__name__,
                                            "overrides": list(hydra_cfg.overrides.task)})
        if hydra_cfg.mode == RunMode.MULTIRUN and not isinstance(err, KeyboardInterrupt):
            log.error("job %s failed: %s", hydra_cfg.job.num, message)
            if state["debug"]:
                traceback.print_exc()
            return None
        raise


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
        return "interrupted: finished stages are cached; rerun the same command to resume"
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
    if type(err).__name__ in ("OverrideParseException", "ConfigCompositionException", "MissingConfigException"):
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
    if state["failed_jobs"]:
        console.print(f"[bold red]error:[/bold red] {len(state['failed_jobs'])} sweep job(s) failed; "
                      "their error.json says why")
        raise typer.Exit(1)


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
