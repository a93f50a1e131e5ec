"""Every file snnbench writes goes through here: written to a temporary name, then renamed."""

import io
import json
import os
import tempfile
from pathlib import Path

import pandas as pd

from snnbench.errors import UserError

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
            raise UserError(f"cannot write {path} ({err.strerror or err}): make {path.parent} writable, or choose "
                            "another folder (hydra.run.dir, cache_dir, report --out)") from err
        raise


def write_csv(path, frame: pd.DataFrame):
    buffer = io.StringIO()
    frame.to_csv(buffer, index=False)
    atomic_write_bytes(path, buffer.getvalue().encode())


def write_json(path, data: dict):
    atomic_write_bytes(path, (json.dumps(data, indent=2, default=str) + "\n").encode())
