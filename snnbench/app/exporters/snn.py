"""`export=[snn]`: the converted spiking network as data in <run>/snn.pt, and load_snn, which makes it again.

The file holds no pickled code (it is read with torch.load(weights_only=True)): the run's config (resolved), the
canonical ANN's state_dict and the conversion as snnbench.conversion.saved writes it for the cache. load_snn
builds the model the config names (its `_target_` importable, as for the run), makes it canonical, loads the ANN's
weights and rebuilds the spiking network from them, strictly: a file that does not fit this code is refused."""

from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from snnbench import api
from snnbench.app.exporters import RunProducts
from snnbench.app.pipeline import build_ann, canonical_ann, method_of
from snnbench.app.train import with_activation
from snnbench.conversion import saved
from snnbench.errors import UserError
from snnbench.io.cache import data_bytes, load_data
from snnbench.io.data import read_data_file
from snnbench.io.files import atomic_write_bytes

FORMAT = "snnbench spiking network 1"  # changed when the file's layout changes


class SpikingNetworkFile:
    """Writes the run's converted spiking network as data to <run>/<file>."""

    def __init__(self, file: str = "snn.pt"):
        if not file or Path(file).name != file:
            raise UserError(f"export.snn.file must be a file name inside the run folder, got {file!r}")
        self.file = file

    def __call__(self, run: RunProducts) -> None:
        config = {key: value for key, value in OmegaConf.to_container(run.config, resolve=True).items()
                  if key != "hydra"}
        ann = {name: value.detach().cpu().clone() for name, value in run.converted.ann.state_dict().items()}
        atomic_write_bytes(run.folder / self.file, data_bytes(
            {"format": FORMAT, "config": config, "ann": ann, "conversion": saved.as_data(run.converted.conversion)}))


@dataclass(frozen=True)
class SavedSNN:
    """A spiking network load_snn read: `converted` is what snnbench.simulate takes; `config` is the run's."""
    converted: api.Converted
    config: DictConfig


def load_snn(path) -> SavedSNN:
    """The spiking network `export=[snn]` saved at `path` (<run>/snn.pt), on the CPU."""
    path = Path(path)
    fix = "export it again (snnbench run ... export=[snn]) with this version of snnbench"
    data = read_data_file(path, load_data, fix)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise UserError(f"{path} is not a spiking network snnbench exported ({FORMAT!r}): {fix}")
    cfg = OmegaConf.create(data["config"])
    ann = canonical_ann(cfg, with_activation(build_ann(cfg), cfg.train))
    try:
        ann.load_state_dict(data["ann"])
        conversion = saved.rebuilt(data["conversion"], ann)
    except (KeyError, ValueError, RuntimeError) as err:  # saved.rebuilt's refusals: another network than this code's
        raise UserError(f"{path} does not fit the network its config builds ({type(err).__name__}: "
                        f"{str(err).splitlines()[0]}): {fix}") from err
    image = torch.zeros(1, cfg.dataset.channels, cfg.dataset.image_size, cfg.dataset.image_size)
    return SavedSNN(api.converted_of(conversion, ann, method_of(cfg), image, T=cfg.sim.T, model=cfg.model.name), cfg)
