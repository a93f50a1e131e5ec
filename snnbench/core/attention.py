"""Attention in parts that torch.fx can trace and snnbench can convert one by one.

torch.fx keeps nn.MultiheadAttention one opaque call (a torch.nn module is a leaf), and cannot trace into it: its
forward branches on its inputs. `TracedAttention` computes the same function with the same weights in plain
operations — three projections (nn.Linear), a split into heads (reshape, transpose), the scale (a multiplication
by a constant), the two products of activations (torch.matmul: Q·Kᵀ and attention·V), softmax, the merge of the
heads and the output projection — each of which a conversion rule can take on its own.
F.scaled_dot_product_attention and the functions torchvision's Swin transformer keeps opaque to torch.fx (its
window attention, patch merging, stochastic depth) are single nodes of a traced graph; the functions below
compute them in the same kind of parts."""

import copy
import math

import torch
import torch.fx
import torch.nn.functional as F
import torchvision.models.swin_transformer as swin
from torch import nn
from torchvision.ops import stochastic_depth as torchvision_stochastic_depth

from snnbench.errors import UserError


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An nn.Linear holding copies of `weight` [out, in] and `bias`."""
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                      device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


class TracedAttention(nn.Module):
    """What `attention` (an evaluated nn.MultiheadAttention, batched inputs) computes, in traceable operations.
    Attention dropout is left out: a converted network is evaluated, never trained."""

    def __init__(self, attention: nn.MultiheadAttention):
        super().__init__()
        if attention.bias_k is not None or attention.add_zero_attn:
            raise UserError("nn.MultiheadAttention with add_bias_kv or add_zero_attn cannot be converted: build it "
                            "with add_bias_kv=False, add_zero_attn=False")
        embed_dim = attention.embed_dim
        if attention.in_proj_weight is not None:
            weights = attention.in_proj_weight.detach().chunk(3)
        else:
            weights = (attention.q_proj_weight.detach(), attention.k_proj_weight.detach(),
                       attention.v_proj_weight.detach())
        biases = (attention.in_proj_bias.detach().chunk(3) if attention.in_proj_bias is not None
                  else (None, None, None))
        self.q_proj, self.k_proj, self.v_proj = (_linear(w, b) for w, b in zip(weights, biases, strict=True))
        out = attention.out_proj
        self.out_proj = _linear(out.weight.detach(), None if out.bias is None else out.bias.detach())
        self.num_heads = attention.num_heads
        self.head_dim = embed_dim // attention.num_heads
        self.batch_first = attention.batch_first

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, batch_first={self.batch_first}"

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        """nn.MultiheadAttention's call: (output, attention weights or None). Masks are refused: a converted
        attention attends to every token (as a ViT's does)."""
        if key_padding_mask is not None or attn_mask is not None:
            raise UserError("nn.MultiheadAttention called with a mask cannot be converted: call it without "
                            "key_padding_mask and attn_mask")
        if not self.batch_first:
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        q = self._heads(self.q_proj(query))  # [batch, heads, target tokens, head dim]
        k = self._heads(self.k_proj(key))    # [batch, heads, source tokens, head dim]
        v = self._heads(self.v_proj(value))
        scores = torch.matmul(q * (1 / math.sqrt(self.head_dim)), k.transpose(-2, -1))
        weights = F.softmax(scores, dim=-1)
        heads = torch.matmul(weights, v)  # [batch, heads, target tokens, head dim]
        output = self.out_proj(heads.transpose(1, 2).flatten(2))
        if not self.batch_first:
            output = output.transpose(0, 1)
        if not need_weights:
            return output, None
        return output, weights.mean(1) if average_attn_weights else weights

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """[batch, tokens, heads x head dim] -> [batch, heads, tokens, head dim]."""
        return x.reshape(x.shape[0], x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False):
    """F.scaled_dot_product_attention in traceable parts: the scale, Q·Kᵀ, softmax, attention·V. Masks, dropout
    and grouped queries are refused: a converted attention attends to every token, and is evaluated."""
    if attn_mask is not None or is_causal or dropout_p or enable_gqa:
        raise UserError("F.scaled_dot_product_attention with a mask, dropout_p or enable_gqa cannot be converted: "
                        "call it with attn_mask=None, is_causal=False, dropout_p=0 (dropout_p=p if self.training "
                        "else 0.0), enable_gqa=False")
    if scale is None:
        scale = query.shape[-1] ** -0.5
    scores = torch.matmul(query * scale, key.transpose(-2, -1))
    return torch.matmul(F.softmax(scores, dim=-1), value)


def shifted_window_attention(input, qkv_weight, proj_weight, relative_position_bias, window_size, num_heads,
                             shift_size, attention_dropout=0.0, dropout=0.0, qkv_bias=None, proj_bias=None,
                             logit_scale=None, training=True):
    """torchvision's Swin window attention (swin_transformer.shifted_window_attention) in traceable parts: zero
    padding, the cyclic shift (torch.roll), the partition into windows (view, permute), the qkv projection
    (F.linear), the scale, Q·Kᵀ, the relative position bias and the shifted windows' mask (constants), softmax,
    attention·V, the output projection and the inverse rearrangement. Swin V2's cosine attention (logit_scale) is
    refused; dropout is left out (a converted network is evaluated)."""
    if logit_scale is not None:
        raise UserError("Swin V2's cosine window attention (logit_scale) cannot be converted: use Swin V1 (swin_t, "
                        "swin_s, swin_b)")
    batch, height, width, channels = input.shape
    window_height, window_width = window_size
    pad_bottom = (window_height - height % window_height) % window_height
    pad_right = (window_width - width % window_width) % window_width
    x = F.pad(input, (0, 0, 0, pad_right, 0, pad_bottom))
    padded_height, padded_width = height + pad_bottom, width + pad_right
    # no shift along a side that one window covers: sizes, so a product with a comparison rather than an `if`
    shift_down = shift_size[0] * (padded_height > window_height)
    shift_right = shift_size[1] * (padded_width > window_width)
    x = torch.roll(x, shifts=(-shift_down, -shift_right), dims=(1, 2))
    rows, columns = padded_height // window_height, padded_width // window_width
    tokens = window_height * window_width
    x = x.view(batch, rows, window_height, columns, window_width, channels).permute(0, 1, 3, 2, 4, 5)
    x = x.reshape(batch * rows * columns, tokens, channels)
    head_dim = channels // num_heads
    qkv = F.linear(x, qkv_weight, qkv_bias).reshape(batch * rows * columns, tokens, 3, num_heads, head_dim)
    qkv = qkv.permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]  # each [windows, heads, tokens, head dim]
    scores = torch.matmul(q * head_dim ** -0.5, k.transpose(-2, -1)) + relative_position_bias
    mask = _shifted_windows_mask(padded_height, padded_width, window_size, shift_size, input.device)
    scores = scores.view(batch, rows * columns, num_heads, tokens, tokens) + mask.unsqueeze(1)
    weights = F.softmax(scores.view(batch * rows * columns, num_heads, tokens, tokens), dim=-1)
    x = torch.matmul(weights, v).transpose(1, 2).reshape(batch * rows * columns, tokens, channels)
    x = F.linear(x, proj_weight, proj_bias)
    x = x.view(batch, rows, columns, window_height, window_width, channels).permute(0, 1, 3, 2, 4, 5)
    x = torch.roll(x.reshape(batch, padded_height, padded_width, channels), shifts=(shift_down, shift_right),
                   dims=(1, 2))
    return x[:, :height, :width, :]


def _shifted_windows_mask(padded_height: int, padded_width: int, window_size, shift_size, device) -> torch.Tensor:
    """[windows, tokens, tokens]: −100 between two tokens of a window that the cyclic shift brought from different
    regions of the map, else 0 (torchvision's mask); all 0 where nothing is shifted. It depends on sizes only: one
    opaque call in a traced graph (torch.fx.wrap), a constant of the network."""
    window_height, window_width = window_size
    shift_down = shift_size[0] if padded_height > window_height else 0
    shift_right = shift_size[1] if padded_width > window_width else 0
    regions = torch.zeros(padded_height, padded_width, device=device)
    if shift_down + shift_right > 0:
        count = 0
        for top, bottom in ((0, -window_height), (-window_height, -shift_down), (-shift_down, None)):
            for left, right in ((0, -window_width), (-window_width, -shift_right), (-shift_right, None)):
                regions[top:bottom, left:right] = count
                count += 1
    regions = regions.view(padded_height // window_height, window_height, padded_width // window_width, window_width)
    regions = regions.permute(0, 2, 1, 3).reshape(-1, window_height * window_width)
    different = regions.unsqueeze(1) != regions.unsqueeze(2)
    return torch.zeros(different.shape, device=device).masked_fill(different, -100.0)


torch.fx.wrap("_shifted_windows_mask")


def patch_merging_pad(x: torch.Tensor) -> torch.Tensor:
    """torchvision's Swin patch merging rearrangement (swin_transformer._patch_merging_pad) in traceable parts:
    zero padding to even sizes, then the four interleaved quarters (strided slices) concatenated on channels."""
    height, width = x.shape[-3], x.shape[-2]
    x = F.pad(x, (0, 0, 0, width % 2, 0, height % 2))
    return torch.cat([x[..., 0::2, 0::2, :], x[..., 1::2, 0::2, :], x[..., 0::2, 1::2, :], x[..., 1::2, 1::2, :]],
                     -1)


def stochastic_depth(input, p, mode, training=True):
    """torchvision.ops.stochastic_depth in a converted network, which is evaluated: its input."""
    return input


# the single nodes of a traced graph that the functions above compute in parts
IN_PARTS = {F.scaled_dot_product_attention: scaled_dot_product_attention,
            swin.shifted_window_attention: shifted_window_attention,
            swin._patch_merging_pad: patch_merging_pad,
            torchvision_stochastic_depth: stochastic_depth}


def with_traceable_transformers(model: nn.Module) -> nn.Module:
    """`model` with its attention in traceable parts, to be traced (again): every nn.MultiheadAttention becomes a
    TracedAttention with its weights and, where `model` is a traced graph, every node of IN_PARTS a call of the
    function that computes it in parts. A copy; `model` itself if it has neither."""
    in_parts = ([node for node in model.graph.nodes if node.op == "call_function" and node.target in IN_PARTS
                 and not _is_cosine_attention(node)] if isinstance(model, torch.fx.GraphModule) else [])
    if not in_parts and not any(isinstance(module, nn.MultiheadAttention) for module in model.modules()):
        return model
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.MultiheadAttention):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, TracedAttention(module))
    if in_parts:
        for node in model.graph.nodes:
            if node.op == "call_function" and node.target in IN_PARTS and not _is_cosine_attention(node):
                node.target = IN_PARTS[node.target]
                node.meta.pop("is_wrapped", None)  # else the recompiled code keeps the function opaque to fx
        model.recompile()
    return model


def _is_cosine_attention(node: torch.fx.Node) -> bool:
    """Swin V2's window attention (a logit_scale): left one opaque call, which conversion refuses."""
    return node.target is swin.shifted_window_attention and node.kwargs.get("logit_scale") is not None
