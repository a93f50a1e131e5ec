"""torchvision's classification zoo, one small member of every family (random weights, 10 classes, the smallest
input it allows): each either converts — the canonical network computes the logits of the model (with max pooling
replaced by average pooling, convert.maxpool=avg, as snnbench trains it) — or is refused in one line naming the
operation and convert.nonlinear=compensate; never another exception. docs/models.md carries the table."""

import pytest
import torch
import torchvision
from networks import randomised

from snnbench.core.graph import canonicalize, with_average_pooling
from snnbench.errors import UserError

# family -> (its smallest member, the smallest input side it allows, keyword arguments beside num_classes)
FAMILIES = {
    "alexnet": ("alexnet", 63, {}),
    "convnext": ("convnext_tiny", 32, {}),
    "densenet": ("densenet121", 32, {}),
    "efficientnet": ("efficientnet_b0", 32, {}),
    "efficientnet_v2": ("efficientnet_v2_s", 32, {}),
    "googlenet": ("googlenet", 32, {"aux_logits": False, "init_weights": True}),
    "inception_v3": ("inception_v3", 75, {"aux_logits": False, "init_weights": True}),
    "maxvit": ("maxvit_t", 224, {}),  # its windows need 224 x 224
    "mnasnet": ("mnasnet0_5", 32, {}),
    "mobilenet_v2": ("mobilenet_v2", 32, {}),
    "mobilenet_v3": ("mobilenet_v3_small", 32, {}),
    "regnet_x": ("regnet_x_400mf", 32, {}),
    "regnet_y": ("regnet_y_400mf", 32, {}),
    "resnet": ("resnet18", 32, {}),
    "resnext": ("resnext50_32x4d", 32, {}),
    "shufflenet_v2": ("shufflenet_v2_x0_5", 32, {}),
    "squeezenet": ("squeezenet1_1", 32, {}),
    "swin": ("swin_t", 32, {}),
    "swin_v2": ("swin_v2_t", 32, {}),
    "vgg": ("vgg11_bn", 32, {}),
    "vit": ("vit_b_16", 32, {"image_size": 32}),
    "wide_resnet": ("wide_resnet50_2", 32, {}),
}
# the families with an operation that has no exact spiking form: the first one, which the refusal names
NONLINEAR = {"convnext": "F.layer_norm", "efficientnet": "nn.SiLU", "efficientnet_v2": "nn.SiLU",
             "maxvit": "nn.GELU", "mobilenet_v3": "nn.Hardswish", "regnet_y": "nn.Sigmoid", "swin": "nn.LayerNorm",
             "swin_v2": "nn.LayerNorm", "vit": "nn.LayerNorm"}
# with convert.nonlinear=compensate: the families still refused, and the operation the refusal names
NOT_EVEN_COMPENSATED = {"maxvit": "einsum", "swin_v2": "shifted_window_attention"}  # V2: cosine attention
SLOW = {"inception_v3", "wide_resnet", "resnext", "vgg", "googlenet"}  # 8 s or more each on 2 busy cores


def family(name: str) -> str:
    """The family of a torchvision model name: the longest family name it starts with."""
    return max((f for f in FAMILIES if name.startswith(f)), key=len)


def test_the_families_cover_the_whole_zoo():
    names = torchvision.models.list_models(module=torchvision.models)
    assert {family(name) for name in names} == set(FAMILIES)
    assert all(member in names for member, _, _ in FAMILIES.values())


@pytest.mark.parametrize("name", [pytest.param(name, marks=pytest.mark.slow) if name in SLOW else name
                                  for name in FAMILIES])
def test_a_zoo_family_converts_exactly_or_is_refused_in_one_line(name):
    member, side, options = FAMILIES[name]
    torch.manual_seed(0)
    model = randomised(getattr(torchvision.models, member)(num_classes=10, **options))
    if name in NONLINEAR:
        with pytest.raises(UserError) as refusal:
            canonicalize(model, maxpool="avg")
        message = str(refusal.value)
        assert "\n" not in message and f"({NONLINEAR[name]})" in message
        assert "add convert.nonlinear=compensate" in message
        if name in NOT_EVEN_COMPENSATED:
            with pytest.raises(UserError, match=NOT_EVEN_COMPENSATED[name]) as refusal:
                canonicalize(model, maxpool="avg", nonlinear="compensate")
            assert "\n" not in str(refusal.value)
            print(f"{name} ({member}): refused, also with compensate: {refusal.value}")
            return
    result = canonicalize(model, maxpool="avg", nonlinear="compensate" if name in NONLINEAR else "refuse")
    x = torch.rand(2, 3, side, side)
    with torch.no_grad():
        expected = with_average_pooling(model).eval()(x)
        torch.testing.assert_close(result.module(x), expected, rtol=1e-4, atol=1e-4)
    assert expected.std() > 0  # logits that differ: an equality of constants would prove nothing
    status = f"with {len(result.analog)} analog operators" if name in NONLINEAR else "exact"
    print(f"{name} ({member}): {status}, {len(result.layers)} spiking layers, {len(result.folded)} BatchNorms folded, "
          f"{len(result.affine)} kept as affine maps, {len(result.replaced)} max poolings replaced")
