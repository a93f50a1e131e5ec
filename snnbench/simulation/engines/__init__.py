"""The simulation engines, each a class (a frozen dataclass subclass of snnbench.simulation.backend.Backend: its
fields are its options) named by the `_target_` of a YAML in an `engine/` config folder:

    torch      the folded PyTorch engine: stateless layers once per chunk of steps, the neurons loop over the steps
    int8       torch, with the spike-fed convs and linear layers in exact int8 arithmetic (CPU, oneDNN)
    triton     torch's layers, and each neuron layer's chunk of steps in one fused Triton kernel (CUDA)
    reference  one full network pass per step, nothing folded, nothing replaced: the oracle of the others
    auto       not an engine: the choice among the others that each engine declares (Backend.auto_preference)

An engine is found one way only: by name, as the YAML file of that name in the engine folders (conf/engine/, and
for the command line every folder of Hydra's search path: hydra.searchpath, --config-dir), built from its
`_target_` and options by build_engine, by the command line and the Python API alike. A new engine is one module
(anywhere importable) and one YAML; `auto` considers it with the others. Nothing here imports torch until an
engine is built."""

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import OmegaConf

from snnbench.errors import UserError
from snnbench.io.configs import CONF_DIR, class_named

if TYPE_CHECKING:
    from snnbench.simulation.backend import Backend

ENGINE_DIR = CONF_DIR / "engine"


def configs(folders: Sequence[Path] | None = None) -> dict[str, dict]:
    """Every engine config by name, as plain dicts: the YAML files of `folders` (None: conf/engine/ alone); where
    two folders hold the same name the first wins, as in Hydra's search path."""
    found = {}
    for folder in (ENGINE_DIR,) if folders is None else folders:
        for path in sorted(Path(folder).glob("*.yaml")):
            found.setdefault(path.stem, OmegaConf.to_container(OmegaConf.load(path), resolve=True))
    return dict(sorted(found.items()))


def names(folders: Sequence[Path] | None = None) -> list[str]:
    return list(configs(folders))


@dataclass(frozen=True)
class Auto:
    """engine=auto: the engine each device gets when none is named."""
    name: str = "auto"

    def choose(self, device, candidates: Iterable["Backend"]) -> "Backend":
        """Among `candidates` (Backends), those that can run on `device` and want to be chosen there, the one
        with the highest auto_preference (the first of them on a tie)."""
        wanted = [(engine.auto_preference(device), -number, engine) for number, engine in enumerate(candidates)]
        wanted = [entry for entry in wanted if entry[0] is not None and entry[2].unavailable(device) is None]
        if not wanted:
            raise UserError(f"engine=auto finds no engine that runs on {device}: name one (engine=torch)")
        return max(wanted, key=lambda entry: entry[:2])[2]


def build_engine(config: Mapping) -> "Backend | Auto":
    """The engine (or Auto) a config mapping describes: `_target_`, the dotted path of a Backend subclass or of
    Auto, and its options, `name` among them; an option the class does not have is refused, listing those it
    has. The one way an engine is made from a config."""
    from snnbench.simulation.backend import Backend

    options = dict(config)
    target = options.pop("_target_", None)
    engine_class = class_named(target, "engine", Backend | Auto, "snnbench.simulation.engines.torch.Torch")
    known = [option.name for option in fields(engine_class)]
    unknown = [str(key) for key in options if key not in known]
    if unknown:
        raise UserError(f"engine {options.get('name', engine_class.__name__)} has no option {', '.join(unknown)}: its "
                        f"options are {', '.join(known)}")
    return engine_class(**options)


def config_of(engine: "Backend") -> dict:
    """The config that build_engine makes `engine` from again (an engine as data, for another process)."""
    return {"_target_": f"{type(engine).__module__}.{type(engine).__qualname__}", **asdict(engine)}


def named(name: str, folders: Sequence[Path] | None = None, **options) -> "Backend | Auto":
    """The engine (or Auto) of the YAML called `name` in `folders`, with `options` set over its own."""
    found = configs(folders)
    if name not in found:
        raise UserError(f"unknown engine '{name}': choose one of {', '.join(found)}")
    return build_engine({**found[name], **options})


def candidates(folders: Sequence[Path] | None = None) -> list["Backend"]:
    """Every engine of `folders`, as its YAML configures it (Auto left out): what auto chooses among."""
    built = [build_engine(config) for config in configs(folders).values()]
    return [engine for engine in built if not isinstance(engine, Auto)]


def resolve(engine: "str | Backend | Auto", device, folders: Sequence[Path] | None = None) -> "Backend":
    """The Backend to simulate with on `device`: `engine` (a Backend), the one named so in `folders`, or auto's
    choice among theirs; an engine that cannot run there is a UserError saying why and the fix."""
    if isinstance(engine, str):
        engine = named(engine, folders)
    if isinstance(engine, Auto):
        return engine.choose(device, candidates(folders))
    from snnbench.simulation.backend import Backend

    if not isinstance(engine, Backend):
        raise UserError(f"engine must be an engine's name ({', '.join(names(folders))}) or an engine object "
                        f"(snnbench.simulation.engines), got {type(engine).__name__}")
    reason = engine.unavailable(device)
    if reason:
        raise UserError(reason)
    return engine
