"""The two consoles (diagnostics on stderr, results on stdout), the log handler and the table of one run."""

import logging
import sys
import time

import pandas as pd
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

console = Console(stderr=True)  # diagnostics: log lines, progress bars, errors, where the results went


results = Console()             # results: the tables of runs and reports, on stdout


class ConsoleLog(RichHandler):
    """Log records on the diagnostics console. In a terminal rich prints them above the progress bars, which
    share that console (a plain handler would write onto a bar's line); into a file or a pipe each is one plain
    line (rich would wrap it at 80 columns), with its level when that is not INFO."""

    def __init__(self):
        super().__init__(console=console, show_path=False)

    def emit(self, record):
        if self.console.is_terminal:
            super().emit(record)
            return
        level = "" if record.levelname == "INFO" else f"{record.levelname.lower()}: "
        self.console.file.write(f"[{time.strftime('%H:%M:%S')}] {level}{self.format(record)}\n")
        self.console.file.flush()


class RunLogFile(logging.FileHandler):
    """The run folder's log file (conf/hydra/job_logging). When it cannot be opened or written (a full disk, a
    folder gone), the log says so once, on stderr, and the file is left alone from then on: no traceback for
    every line, and the run goes on."""

    def __init__(self, filename, **kwargs):
        super().__init__(filename, **{**kwargs, "delay": True})  # opened at the first line, where failing is handled
        self.failed = False

    def emit(self, record):
        if self.failed:
            return
        try:
            super().emit(record)
        except Exception:  # opening the file; a failed write StreamHandler.emit hands to handleError itself
            self.handleError(record)

    def handleError(self, record):
        if self.failed:
            return
        self.failed = True
        error = sys.exc_info()[1]
        reason = error.strerror if isinstance(error, OSError) and error.strerror else error
        logging.getLogger("snnbench").warning("cannot write the log file %s (%s): log lines go to stderr only",
                                              self.baseFilename, reason)


def milestones(T: int) -> list[int]:
    """The t shown in terminal tables: powers of two up to T, and T."""
    return sorted({2**k for k in range(T.bit_length())} | {T})


def show_run(summary: dict, accuracy: pd.DataFrame):
    """ANN accuracy, SNN accuracy and events per image at a few t (powers of two and T)."""
    T = summary["T"]
    table = Table(title=f"{summary['method']} on {summary['dataset']} / {summary['model']}: "
                        f"ANN {100 * summary['ann_accuracy']:.2f} %")
    table.add_column("t", justify="right")
    table.add_column("SNN accuracy %", justify="right")
    table.add_column("events / image", justify="right")
    table.add_column("spike units / image", justify="right")
    rows = accuracy.set_index("t")
    for t in milestones(T):
        row = rows.loc[t]
        table.add_row(str(t), f"{100 * row.accuracy:.2f}", f"{row.events_per_image:,.0f}",
                      f"{row.spike_units_per_image:,.0f}")
    results.print(table)
