"""The device a run computes on (`device=auto|cpu|cuda|cuda:N`) and the engine it simulates with there
(`engine=...`). On a machine with several GPUs `device=auto` gives each process a GPU of its own: the first one
that no other snnbench process of this user holds (a lock per GPU, held until the process exits), so the jobs of a
parallel sweep never share a GPU unless a device is named."""

import fcntl
import importlib.resources
import importlib.util
import os
import tempfile
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from snnbench.app.validate import check_device
from snnbench.errors import UserError
from snnbench.simulation import engines
from snnbench.simulation.backend import Backend

# the GPU this process took, kept until it exits: a joblib worker runs every job it is given on it
_claimed = {}


def resolve_device(name: str) -> str:
    """`device` as a torch device name; `auto` is a GPU of this process's own when there are several."""
    check_device(name)
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if name == "cpu" or (name == "auto" and count == 0):
        return "cpu"
    if name == "auto":
        if count == 1:
            return "cuda"
        gpus = [str(torch.cuda.get_device_properties(index).uuid) for index in range(count)]
        return f"cuda:{claim_gpu(gpus, gpu_lock_folder())}"
    if count == 0:
        raise UserError(f"device={name} but no CUDA device is available: use device=auto or device=cpu")
    index = int(name.partition(":")[2] or 0)
    if index >= count:
        raise UserError(f"device={name} but this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}: "
                        f"choose one of them, or device=auto")
    return name


def gpu_lock_folder() -> Path:
    return Path(tempfile.gettempdir()) / f"snnbench-gpus-{os.getuid()}"


def claim_gpu(gpus: list[str], folder: Path) -> int:
    """The index in `gpus` (stable names: UUIDs, which differ between the GPUs of two SLURM jobs on one node even
    where both see theirs as cuda:0) of the first GPU no other process holds, now held by this one; the one it holds
    already when it asks again."""
    if "index" in _claimed:
        return _claimed["index"]
    folder.mkdir(parents=True, exist_ok=True)
    for index, gpu in enumerate(gpus):
        lock = open(folder / f"{gpu}.lock", "w")  # held open: the lock lasts as long as the process
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            continue
        _claimed.update(index=index, lock=lock)
        return index
    raise UserError(f"device=auto: all {len(gpus)} GPUs here are held by other snnbench jobs: run at most "
                    f"{len(gpus)} at once (hydra.launcher.n_jobs={len(gpus)}), or share one with device=cuda:N")


def engine_folders() -> list[Path]:
    """The engine/ folders of the config search path in Hydra's order (conf/, hydra.searchpath, --config-dir):
    where `engine=<name>` and `engine=auto` find engines. Outside a composed config, conf/engine/ alone."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return [engines.ENGINE_DIR]
    folders = []
    for source in HydraConfig.get().runtime.config_sources:
        if source.schema == "file":
            folders.append(Path(source.path) / "engine")
        elif source.schema == "pkg" and importlib.util.find_spec(source.path.replace("/", ".")) is not None:
            folders.append(Path(str(importlib.resources.files(source.path.replace("/", ".")))) / "engine")
    return folders


def simulation_engine(engine: DictConfig, device: str) -> Backend:
    """The engine that the run's `engine` config describes, able to run on `device` (auto: the one chosen among the
    engines of the config search path), or a UserError saying why it cannot run and the fix."""
    return engines.resolve(engines.build_engine(OmegaConf.to_container(engine, resolve=True)), device,
                           engine_folders())
