import pytest
import torch
from omegaconf import OmegaConf

from snnbench.convert import apply_maxpool_policy, fan_out, fold_batchnorm, relu_names
from snnbench.errors import UserError
from snnbench.models import build_model

DATA = OmegaConf.create({"channels": 3, "image_size": 16, "num_classes": 10, "mean": [0.5] * 3, "std": [0.25] * 3})


def randomised(model):
    """Non-trivial BatchNorm statistics, so folding has something to get wrong."""
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm1d | torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.5, 0.5)
    return model.eval()


@pytest.mark.parametrize("spec", [
    {"name": "mlp", "arch": "convnet", "layers": [], "hidden": [32, 16]},
    {"name": "cnn", "arch": "convnet", "layers": [8, "P", 16, "P"], "hidden": [32]},
    {"name": "resnet20", "arch": "resnet", "depth": 20},
])
def test_bn_folding_preserves_logits(spec):
    model = randomised(build_model(OmegaConf.create(spec), DATA))
    x = torch.rand(4, 3, 16, 16)
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d | torch.nn.BatchNorm1d) for m in folded.modules())
    torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-4)


def test_maxpool_is_refused_unless_replaced():
    model = build_model(OmegaConf.create({"name": "c", "arch": "convnet", "layers": [8, "P"], "hidden": [],
                                          "pool": "max"}), DATA)
    with pytest.raises(UserError, match="convert.maxpool=avg"):
        apply_maxpool_policy(model, "error")
    replaced = apply_maxpool_policy(model, "avg")
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in replaced.modules())


def test_fan_out_counts_synapses():
    model = build_model(OmegaConf.create({"name": "c", "arch": "convnet", "layers": [8, "P", 16], "hidden": [32]}),
                        DATA)
    names = relu_names(model)
    fans = fan_out(model)
    assert fans[names[0]] == 16 * 9          # through the pooling into a 3x3 conv with 16 outputs
    assert fans[names[1]] == 32              # flattened into a linear layer of 32
    resnet = build_model(OmegaConf.create({"name": "r", "arch": "resnet", "depth": 20}), DATA)
    # the stem's neuron feeds block 1's conv (16 x 9) and, through the identity shortcut, one neuron
    assert fan_out(resnet)["relu"] == 16 * 9 + 1
