"""torchvision's VisionTransformer for images with any number of channels (its patch embedding expects RGB)."""

import math

from torch import nn
from torchvision.models import VisionTransformer


def vision_transformer(*, in_channels: int, image_size: int, patch_size: int, num_layers: int, num_heads: int,
                       hidden_dim: int, mlp_dim: int, num_classes: int) -> VisionTransformer:
    """torchvision's VisionTransformer whose patch embedding reads `in_channels` channels (e.g. 1 for MNIST),
    initialised as torchvision initialises its own (truncated normal scaled by the fan-in, zero bias)."""
    model = VisionTransformer(image_size=image_size, patch_size=patch_size, num_layers=num_layers,
                              num_heads=num_heads, hidden_dim=hidden_dim, mlp_dim=mlp_dim, num_classes=num_classes)
    patch_embedding = nn.Conv2d(in_channels, hidden_dim, kernel_size=patch_size, stride=patch_size)
    fan_in = in_channels * patch_size * patch_size
    nn.init.trunc_normal_(patch_embedding.weight, std=math.sqrt(1 / fan_in))
    nn.init.zeros_(patch_embedding.bias)
    model.conv_proj = patch_embedding
    return model
