"""QCFS (Bu et al., ICLR 2022, "Optimal ANN-SNN conversion for high-accuracy and ultra-low-latency spiking neural
networks"; putshua/SNN_conversion_QCFS): the ANN is trained with quantisation-clip-floor-shift activations
(train.activation=qcfs, snnbench.models.qcfs), and each becomes a binary IF neuron whose threshold is its learnt
lambda, starting at half of it (their ScaledNeuron charges the membrane with 0.5 x lambda first): then for a
constant input the neuron's rate over T = L steps is the activation itself."""

from dataclasses import dataclass

from snnbench.conversion.methods import Method, check_number, converted, spiking_copy
from snnbench.core.graph import spiking_layer_names
from snnbench.errors import UserError
from snnbench.models.qcfs import QCFS as QCFSActivation

TRAINED = ("qcfs converts an ANN trained with QCFS activations: add train.activation=qcfs train.qcfs_levels=8 "
           "(and train.init_checkpoint=<weights> to fine-tune a trained network), or see experiment=qcfs_resnet20")


@dataclass(frozen=True)
class QCFS(Method):
    name: str = "qcfs"
    trained_with: str | None = "qcfs"  # the ANN's training activation (the CLI: train.activation); must be qcfs
    v0: float = 0.5                    # initial membrane potential, in units of the threshold

    def validate(self):
        if self.trained_with != "qcfs":
            raise UserError(f"method={TRAINED}")
        check_number("v0", self.v0, example=0.5)

    def convert(self, ann, calibration, batches, context):
        thresholds = {}
        for name in spiking_layer_names(ann):
            activation = ann.get_submodule(name)
            if not isinstance(activation, QCFSActivation):
                raise UserError(f"spiking layer {name} is a plain ReLU, and method={TRAINED}")
            if activation.threshold.item() <= 0:
                raise UserError(f"QCFS layer {name} learnt lambda = {activation.threshold.item():.4g}, which cannot "
                                "be a threshold: train again with a lower train.lr")
            thresholds[name] = activation.threshold.detach().clone()
        return converted(ann, calibration, spiking_copy(ann, thresholds, v0=self.v0))
