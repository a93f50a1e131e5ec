"""The content-addressed cache: an entry is built once (under a lock), saved atomically and recorded with its
sha256 and key."""

import fcntl
import hashlib
import json
import logging
from contextlib import contextmanager
from pathlib import Path

from snnbench.errors import UserError
from snnbench.io.files import atomic_write_bytes

log = logging.getLogger("snnbench")

def sha256_of(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def config_hash(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


@contextmanager
def claimed(path: Path):
    """Hold an exclusive lock on `path`.lock: parallel sweep jobs wait instead of building the same entry."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(path.with_suffix(".lock"), "w")
    except OSError as err:
        raise UserError(f"cannot write the cache entry {path} ({err.strerror}): set cache_dir=<a folder that can be "
                        "written> (or env SNNBENCH_CACHE)") from err
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def cached(path: Path, key: str, build, save, load):
    """Load the cache entry at `path` if its recorded sha256 and config key match; otherwise build it (once,
    under a lock), save it atomically and record both. Returns (value, sha256, was_cached)."""
    meta_path = path.with_suffix(".json")
    with claimed(path):
        if path.exists() or meta_path.exists():
            entry = _load_verified(path, meta_path, key, load)
            if entry:
                return *entry, True
            log.warning("cache entry %s does not match its recorded sha256 and config key, or cannot be loaded "
                        "(corrupted, or left by an interrupted run): rebuilding it", path)
        value = build()
        atomic_write_bytes(path, save(value))
        digest = sha256_of(path)
        atomic_write_bytes(meta_path, json.dumps({"key": key, "sha256": digest}).encode())
        return value, digest, False


def _load_verified(path: Path, meta_path: Path, key: str, load):
    """(value, sha256) of a cache entry whose file matches its record (sha256 and config key), else None."""
    try:
        meta = json.loads(meta_path.read_text())
        if meta["key"] != key or meta["sha256"] != sha256_of(path):
            return None
        return load(path), meta["sha256"]
    except Exception:  # a missing, damaged or unloadable part: the entry is rebuilt, never used
        return None
