"""nn.MultiheadAttention in traceable parts: the same outputs with the same weights, and a torchvision ViT traced
down to its projections, products of activations and softmax."""


import pytest
import torch
import torch.fx
import torch.nn.functional as F
from helpers import TESTS
from torch import nn

from snnbench.core.attention import TracedAttention, with_traceable_transformers
from snnbench.errors import UserError
from snnbench.models.vit import vision_transformer


def random_attention(seed, **options):
    torch.manual_seed(seed)
    attention = nn.MultiheadAttention(16, 4, **options).eval()
    with torch.no_grad():  # PyTorch initialises the biases to zero: make them count
        for name, parameter in attention.named_parameters():
            if "bias" in name:
                parameter.normal_()
    return attention


@pytest.mark.parametrize("options", [{"batch_first": True}, {"batch_first": False}, {"bias": False},
                                     {"kdim": 8, "vdim": 12, "batch_first": True}])
def test_traced_attention_computes_what_multihead_attention_does(options):
    attention = random_attention(0, **options)
    generator = torch.Generator().manual_seed(1)
    shape = (3, 5) if options.get("batch_first") else (5, 3)
    query = torch.randn(*shape, 16, generator=generator)
    key = torch.randn(*shape, options.get("kdim", 16), generator=generator)
    value = torch.randn(*shape, options.get("vdim", 16), generator=generator)
    traced = TracedAttention(attention)
    with torch.no_grad():
        for need_weights, average in ((False, True), (True, True), (True, False)):
            expected = attention(query, key, value, need_weights=need_weights, average_attn_weights=average)
            got = traced(query, key, value, need_weights=need_weights, average_attn_weights=average)
            torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-5)
            if need_weights:
                torch.testing.assert_close(got[1], expected[1], rtol=1e-5, atol=1e-6)
            else:
                assert got[1] is None and expected[1] is None


def test_masks_and_bias_kv_are_refused_in_one_line():
    with pytest.raises(UserError, match="add_bias_kv"):
        TracedAttention(nn.MultiheadAttention(16, 4, add_bias_kv=True))
    traced = TracedAttention(random_attention(0, batch_first=True))
    x = torch.randn(2, 3, 16)
    with pytest.raises(UserError, match="without key_padding_mask and attn_mask"):
        traced(x, x, x, key_padding_mask=torch.zeros(2, 3, dtype=torch.bool))


def test_a_torchvision_vit_traces_into_products_and_softmax():
    torch.manual_seed(0)
    model = vision_transformer(in_channels=1, image_size=28, patch_size=7, num_layers=2, num_heads=4,
                               hidden_dim=32, mlp_dim=64, num_classes=10).eval()
    torch.nn.init.normal_(model.heads.head.weight)  # torchvision starts the head at zero: every logit 0
    converted = with_traceable_transformers(model)
    assert any(isinstance(m, nn.MultiheadAttention) for m in model.modules())  # the model itself is kept
    graph = torch.fx.symbolic_trace(converted)
    modules = dict(graph.named_modules())
    called = [type(modules[node.target]) for node in graph.graph.nodes if node.op == "call_module"]
    functions = [node.target for node in graph.graph.nodes if node.op == "call_function"]
    assert nn.MultiheadAttention not in called
    assert functions.count(torch.matmul) == 2 * 2 and functions.count(torch.nn.functional.softmax) == 2
    assert called.count(nn.Linear) == 2 * (3 + 1 + 2) + 1  # q, k, v, out; the MLP's two; the head
    images = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(graph(images), model(images), rtol=1e-5, atol=1e-5)


class FunctionalAttention(nn.Module):
    """Single-head attention written with F.scaled_dot_product_attention."""

    def __init__(self, scale=None, is_causal=False):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.scale, self.is_causal = scale, is_causal

    def forward(self, x):
        return F.scaled_dot_product_attention(self.q(x), self.k(x), self.v(x), scale=self.scale,
                                              is_causal=self.is_causal)


def functions_called(graph: torch.fx.GraphModule) -> list:
    return [node.target for node in graph.graph.nodes if node.op == "call_function"]


@pytest.mark.parametrize("scale", [None, 0.3])
def test_scaled_dot_product_attention_traces_into_products_and_softmax(scale):
    torch.manual_seed(0)
    model = FunctionalAttention(scale).eval()
    traced = torch.fx.symbolic_trace(model)
    assert F.scaled_dot_product_attention in functions_called(traced)
    graph = torch.fx.symbolic_trace(with_traceable_transformers(traced))
    functions = functions_called(graph)
    assert F.scaled_dot_product_attention not in functions
    assert functions.count(torch.matmul) == 2 and functions.count(F.softmax) == 1
    x = torch.randn(3, 5, 8)
    with torch.no_grad():
        torch.testing.assert_close(graph(x), model(x), rtol=1e-5, atol=1e-6)
    assert F.scaled_dot_product_attention in functions_called(traced)  # the traced graph given is kept


def test_scaled_dot_product_attention_with_a_mask_is_refused_in_one_line():
    rewritten = with_traceable_transformers(torch.fx.symbolic_trace(FunctionalAttention(is_causal=True)))
    with pytest.raises(UserError, match="is_causal=False"):
        rewritten(torch.randn(1, 4, 8))


@pytest.mark.parametrize("size", [64, 100])  # 100: the feature maps need padding to whole windows
def test_torchvision_swin_traces_into_products_and_softmax(size):
    """swin_t keeps its window attention, patch merging and stochastic depth opaque to torch.fx; in parts, it
    computes the same logits with nothing opaque left but constants (relative position bias, shift mask)."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.swin_t(num_classes=10).eval()
    torch.nn.init.normal_(model.head.weight)  # torchvision starts the head at zero: every logit 0
    graph = torch.fx.symbolic_trace(with_traceable_transformers(torch.fx.symbolic_trace(model)))
    functions = functions_called(graph)
    opaque = {torchvision.models.swin_transformer.shifted_window_attention,
              torchvision.models.swin_transformer._patch_merging_pad, torchvision.ops.stochastic_depth}
    assert not opaque & set(functions)
    assert functions.count(torch.matmul) == 2 * 12 and functions.count(F.softmax) == 12
    images = torch.rand(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(graph(images), model(images), rtol=1e-5, atol=1e-4)


class AttentionThenExp(nn.Module):
    """Tokens from an 8 x 8 image through nn.MultiheadAttention, then torch.exp: an operation nothing converts."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.embed = nn.Linear(1, 8)
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, num_classes)

    def forward(self, images):
        tokens = torch.relu(self.embed(images.flatten(2).transpose(1, 2)))
        attended, _ = self.attention(tokens, tokens, tokens, need_weights=False)
        return self.head(torch.exp(attended).mean(1))


def test_a_refusal_after_rebuilt_attention_names_the_users_line(monkeypatch):
    """The model is traced again once its attention is in parts; the refusal still names the user's source line,
    not the generated code (`<eval_with_key>.N`) that the second trace ran."""
    import inspect as source

    from typer.testing import CliRunner

    from snnbench.app.cli import app

    lines, first = source.getsourcelines(AttentionThenExp.forward)
    exp_line = first + next(k for k, line in enumerate(lines) if "torch.exp" in line)
    monkeypatch.chdir(TESTS)
    inspected = CliRunner().invoke(app, ["inspect", "model=custom", "model._target_=test_attention.AttentionThenExp",
                                         "convert.nonlinear=compensate"])
    assert inspected.exit_code == 2
    assert inspected.output.count("\n") == 1 and "eval_with_key" not in inspected.output
    assert inspected.output.startswith(f"error: cannot convert node exp (torch.exp) at test_attention.py:{exp_line}: "
                                       "it is neither a ReLU-family activation")
