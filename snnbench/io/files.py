"""Every file snnbench writes goes through here: written to a temporary name, then renamed."""

import errno
import io
import json
import math
import os
import tempfile
from pathlib import Path

import pandas as pd

from snnbench.errors import UserError

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)  # no space left, or the user's quota used up
UMASK = os.umask(0o022)  # read the process umask (the call also sets it) ...


def atomic_write_bytes(path, data: bytes):
    """Write to a temporary name in the same folder, then rename: a reader never sees half a file. Every file
    snnbench writes goes through here; one that cannot be written is a UserError naming it."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~UMASK)  # mkstemp makes it private (0600); open() would not
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if tmp:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise UserError(f"cannot write {path} {why_not_written(err, path.parent)}, or choose another folder "
                            "(hydra.run.dir, cache_dir, report --out)") from err
        raise


def why_not_written(err: OSError, folder) -> str:
    """"(reason): what to do" for a file in `folder` that could not be written; a full disk is named as such."""
    if err.errno in DISK_FULL:
        return f"({err.strerror}): the disk holding {folder} is full: free space on it"
    return f"({err.strerror or err}): make {folder} writable"


def write_csv(path, frame: pd.DataFrame):
    buffer = io.StringIO()
    frame.to_csv(buffer, index=False)
    atomic_write_bytes(path, buffer.getvalue().encode())


def write_json(path, data: dict):
    """Strict JSON: a number that is not finite, which JSON cannot hold (Python would write a bare NaN token that
    other readers refuse), is a UserError naming it."""
    for key, value in _non_finite(data):
        raise UserError(f"cannot write {path}: its {key} is {value}, which JSON cannot hold (the run's numbers "
                        "overflowed or became undefined: check its knobs and checkpoint for extreme values)")
    atomic_write_bytes(path, (json.dumps(data, indent=2, default=str, allow_nan=False) + "\n").encode())


def _non_finite(node, key="value"):
    """(key, value) of every float in nested dicts and lists that is not finite."""
    if isinstance(node, dict):
        for name, value in node.items():
            yield from _non_finite(value, name if key == "value" else f"{key}.{name}")
    elif isinstance(node, list | tuple):
        for index, value in enumerate(node):
            yield from _non_finite(value, f"{key}[{index}]")
    elif isinstance(node, float) and not math.isfinite(node):
        yield key, node
