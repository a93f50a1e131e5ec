"""The content-addressed cache: an entry is built once (under a lock), saved atomically and recorded with its
sha256 and key.

Trust model: an entry is data (tensors and plain values, read with torch.load(weights_only=True)), never code,
and nothing here follows a link planted in the cache: whoever can write the cache can change results (the
sha256 beside an entry only detects damage), never run code or write a file outside it."""

import ast
import errno
import fcntl
import functools
import hashlib
import io
import json
import logging
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from snnbench.errors import UserError
from snnbench.io.files import atomic_write_bytes

log = logging.getLogger("snnbench")
PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # snnbench/, whose source the code versions hash


class StaleEntry(Exception):
    """A cache entry that is missing, damaged, recorded for another key, or that does not fit this code."""


def sha256_of(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def config_hash(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def code_version(*parts: str) -> str:
    """A hash of the code in `parts` (files and folders of the snnbench package): part of the key of every entry
    that code produces, so that an upgrade that changes it rebuilds the entry. Comments and docstrings do not
    count."""
    return _code_hash(PACKAGE_ROOT, parts)


@functools.cache
def _code_hash(root: Path, parts: tuple[str, ...]) -> str:
    digest = hashlib.sha256()
    for part in parts:
        files = sorted((root / part).rglob("*.py")) if (root / part).is_dir() else [root / part]
        for file in files:
            digest.update(f"{file.relative_to(root)}\n{_code_of(file.read_text())}\n".encode())
    return digest.hexdigest()[:16]


def _code_of(source: str) -> str:
    """The syntax tree of `source` without its docstrings (ast.dump leaves comments and layout out)."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree)


def data_bytes(data) -> bytes:
    """`data` (tensors, dicts, lists, strings, numbers) as the bytes of a cache entry."""
    buffer = io.BytesIO()
    torch.save(data, buffer)
    return buffer.getvalue()


def load_data(path):
    """A cache entry's data, read safely: torch.load(weights_only=True) refuses anything but tensors and plain
    values, so that an entry someone replaced cannot run code."""
    return torch.load(path, map_location="cpu", weights_only=True)


def _open_lock(lock: Path) -> int:
    """The lock file's descriptor, opened without following a link and without truncating: a link planted at
    the lock's path is removed (once, with a warning), never written through."""
    # opened for writing (never written): on NFS, where shared caches often live, flock takes an exclusive lock
    # on writable descriptors only
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return os.open(lock, flags, 0o666)
    except OSError as err:
        if err.errno != errno.ELOOP:
            raise
    log.warning("cache lock %s is a symbolic link (to %s), which snnbench never follows: removed it", lock,
                os.readlink(lock))
    lock.unlink(missing_ok=True)
    return os.open(lock, flags, 0o666)


@contextmanager
def claimed(path: Path):
    """Hold an exclusive lock on `path`.lock: parallel sweep jobs wait instead of building the same entry. A job
    that has to wait says once which run holds the entry and where; the holder is recorded beside the lock (never
    in it: a lock planted as a hard link to another file must not be written)."""
    holder = path.with_suffix(".holder.json")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = _open_lock(path.with_suffix(".lock"))
    except OSError as err:
        raise UserError(f"cannot write the cache entry {path} ({err.strerror}): set cache_dir=<a folder that can be "
                        "written> (or env SNNBENCH_CACHE)") from err
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for cache entry %s: %s is building it; this run goes on when it is done", path.name,
                     _described_holder(holder))
            fcntl.flock(lock, fcntl.LOCK_EX)
        _remove_interrupted_writes(path)
        atomic_write_bytes(holder, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                               "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                                               "command": " ".join(sys.argv)}).encode())
        yield
    finally:
        holder.unlink(missing_ok=True)
        os.close(lock)  # releases the lock


def _described_holder(holder: Path) -> str:
    """Which run holds an entry, as its holder record says (the record is only ever shown, never trusted)."""
    try:
        record = json.loads(holder.read_text())
        return (f"run {record['pid']} on {record['host']} (since {record['since']}: {record['command']})")
    except (OSError, ValueError, KeyError, TypeError):
        return "another run"


def _remove_interrupted_writes(path: Path):
    """The temporary files of this entry and its record that a killed run left behind (the lock is held: no live
    run is writing them)."""
    for name in (path.name, path.with_suffix(".json").name, path.with_suffix(".holder.json").name):
        for leftover in path.parent.glob(f".{name}.*.tmp"):
            leftover.unlink(missing_ok=True)


def cached(path: Path, key: str, build, save, load):
    """Load the cache entry at `path` if its recorded sha256 and config key match and it loads; otherwise build it
    (once, under a lock), save it atomically and record both. A complete entry is read without a lock, so a cache
    that is read-only, or another user's, serves every entry it holds. `save(value)` gives the entry's bytes
    (data_bytes), `load(path)` the value (load_data), raising on anything that does not fit. Returns (value,
    sha256, was_cached)."""
    meta_path = path.with_suffix(".json")
    if path.exists():
        try:
            return *_load_verified(path, meta_path, key, load), True
        except StaleEntry:
            pass  # checked again under the lock: another job may be replacing it right now
    with claimed(path):
        if path.exists() or meta_path.exists():
            try:
                return *_load_verified(path, meta_path, key, load), True
            except StaleEntry as stale:
                log.warning("cache entry %s does not match its recorded sha256 and config key, or cannot be "
                            "loaded (%s; corrupted, left by an interrupted run or written by another snnbench "
                            "version): rebuilding it", path, stale)
        value = build()
        atomic_write_bytes(path, save(value))
        digest = sha256_of(path)
        atomic_write_bytes(meta_path, json.dumps({"key": key, "sha256": digest}).encode())
        return value, digest, False


def _load_verified(path: Path, meta_path: Path, key: str, load):
    """(value, sha256) of a cache entry whose file matches its record (sha256 and config key) and loads; else
    StaleEntry saying why."""
    try:
        meta = json.loads(meta_path.read_text())
        if meta["key"] != key:
            raise StaleEntry("recorded for another key")
        if meta["sha256"] != sha256_of(path):
            raise StaleEntry("its sha256 differs from the record")
        return load(path), meta["sha256"]
    except StaleEntry:
        raise
    except Exception as err:  # a missing, damaged or unloadable part: the entry is rebuilt, never used
        lines = str(err).strip().splitlines()
        raise StaleEntry(f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__) from err
