"""Networks written the way researchers write them, outside the package, for the conversion tests: importable as
`user_models.<Name>` (tests/ is on sys.path)."""

import torch
import torch.nn.functional as F
from torch import nn


class Mixed(nn.Module):
    """Every ReLU form at once: one ReLU module called twice (in place), F.relu, torch.relu, Tensor.relu_, a
    channel concatenation, a 1x1-conv + BN downsampling shortcut, an identity shortcut added in place, dropout and
    torch.flatten. Ten ReLU call sites."""

    def __init__(self, in_channels=1, num_classes=10, width=8):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.side = nn.Conv2d(width, width, 1)
        self.down_conv = nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1, bias=False)
        self.down_bn = nn.BatchNorm2d(2 * width)
        self.down_conv2 = nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False)
        self.down_bn2 = nn.BatchNorm2d(2 * width)
        self.shortcut = nn.Sequential(nn.Conv2d(2 * width, 2 * width, 1, stride=2, bias=False),
                                      nn.BatchNorm2d(2 * width))
        self.head_conv = nn.Conv2d(2 * width, 2 * width, 3, padding=1)
        self.dropout = nn.Dropout(0.2)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(8 * width, 32)
        self.fc2 = nn.Linear(32, 32)
        self.classifier = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.relu(self.stem_bn(self.stem(x)))                       # 1: nn.ReLU, first call
        out = self.relu(self.bn1(self.conv1(x)))                        # 2: the same module again
        out = self.bn2(self.conv2(out))
        out += x
        out = F.relu(out)                                               # 3: F.relu after an in-place addition
        branch = torch.relu(self.side(x) * 0.5)                         # 4: torch.relu of a scaled conv
        y = torch.cat([out, branch], 1)
        down = F.relu(self.down_bn(self.down_conv(y)), inplace=True)    # 5: F.relu in place
        down = self.down_bn2(self.down_conv2(down))
        z = down + self.shortcut(y)
        z.relu_()                                                       # 6: Tensor.relu_ as a statement
        z = self.relu(self.head_conv(z))                                # 7: the reused module, third call
        z = torch.flatten(self.pool(self.dropout(z)), 1)
        z = self.fc(F.dropout(z, 0.1, self.training)).relu()            # 8: Tensor.relu after functional dropout
        z = F.relu(self.fc2(z))                                         # 9: F.relu
        return self.classifier(torch.relu(z - 0.0))                     # 10: torch.relu of an affine map


class WithGelu(nn.Module):
    def __init__(self, in_channels=1, num_classes=10):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.act = nn.GELU()
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.act(self.conv(x)), 1), 1))


class GatedProduct(nn.Module):
    """A product of two activations: not a linear map of spikes."""

    def __init__(self, in_channels=1, num_classes=10):
        super().__init__()
        self.a = nn.Linear(in_channels * 64, 16)
        self.b = nn.Linear(in_channels * 64, 16)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = torch.flatten(x, 1)
        return self.fc(torch.relu(self.a(x)) * torch.relu(self.b(x)))


def mixed_factory(width=8, num_classes=10):
    """A factory, as `_target_` may name one instead of a class."""
    return Mixed(in_channels=1, num_classes=num_classes, width=width)


class SqueezeExcite(nn.Module):
    """A squeeze-excitation gate: the input times a sigmoid of its pooled channels (a product of two computed
    tensors)."""

    def __init__(self, channels, reduced):
        super().__init__()
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.act = nn.SiLU()
        self.expand = nn.Conv2d(reduced, channels, 1)

    def forward(self, x):
        gate = self.expand(self.act(self.reduce(F.adaptive_avg_pool2d(x, 1))))
        return x * torch.sigmoid(gate)


class MobileStyle(nn.Module):
    """An EfficientNet- / MobileNetV3-style network, which converts with convert.nonlinear=compensate: Hardswish
    and SiLU (module and function), a depthwise conv, a squeeze-excitation gate, a residual inverted bottleneck,
    strided stem and head convs (so that the pooled features see more than strokes)."""

    def __init__(self, in_channels=1, num_classes=10, width=8):
        super().__init__()
        wide = 2 * width
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, stride=2, padding=1, bias=False),
                                  nn.BatchNorm2d(width), nn.Hardswish())
        self.expand = nn.Sequential(nn.Conv2d(width, wide, 1, bias=False), nn.BatchNorm2d(wide), nn.SiLU())
        self.depthwise = nn.Conv2d(wide, wide, 3, padding=1, groups=wide, bias=False)
        self.depthwise_bn = nn.BatchNorm2d(wide)
        self.se = SqueezeExcite(wide, max(width // 2, 2))
        self.project = nn.Sequential(nn.Conv2d(wide, width, 1, bias=False), nn.BatchNorm2d(width))
        self.head = nn.Sequential(nn.Conv2d(width, wide, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(wide),
                                  nn.Hardswish())
        self.classifier = nn.Linear(wide, num_classes)

    def forward(self, x):
        x = self.stem(x)
        y = F.silu(self.depthwise_bn(self.depthwise(self.expand(x))))
        x = x + self.project(self.se(y))
        x = F.adaptive_avg_pool2d(self.head(x), 1)
        return self.classifier(torch.flatten(x, 1))


class MnistExample(nn.Module):
    """The network of PyTorch's MNIST example (pytorch/examples, mnist/main.py), as written there: F.max_pool2d,
    dropout and F.log_softmax; for 28 x 28 images."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(9216, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        x = self.conv1(x)
        x = F.relu(x)
        x = self.conv2(x)
        x = F.relu(x)
        x = F.max_pool2d(x, 2)
        x = self.dropout1(x)
        x = torch.flatten(x, 1)
        x = self.fc1(x)
        x = F.relu(x)
        x = self.dropout2(x)
        x = self.fc2(x)
        output = F.log_softmax(x, dim=1)
        return output


class Clipped(nn.Module):
    """Every form of a clipped ReLU (clip at 0 and at a positive bound), and the clamps that are plain ReLUs."""

    def __init__(self, in_channels=1, num_classes=10):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 8, 3, padding=1)
        self.relu6 = nn.ReLU6()
        self.hardtanh = nn.Hardtanh(0.0, 3.0)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        x = self.relu6(self.conv(x) * 4)                 # clip 6
        x = F.relu6(x * 2 - 3)                           # clip 6
        x = self.hardtanh(x - 1)                         # clip 3
        x = F.hardtanh(x * 2 - 2, 0.0, 2.0)              # clip 2
        x = torch.clamp(x * 3 - 1, min=0, max=4)         # clip 4
        x = (x - 1).clamp(0, 5)                          # clip 5
        x = (x - 1).clamp_min(0)                         # a ReLU
        x = torch.clamp(x - 0.5, min=0.0)                # a ReLU
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class Leaky(nn.Module):
    """Leaky ReLUs: a module, the function, and a PReLU with a slope per channel."""

    def __init__(self, in_channels=1, num_classes=10):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 8, 3, padding=1)
        self.leaky = nn.LeakyReLU(0.1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.prelu = nn.PReLU(8, init=0.3)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        x = self.leaky(self.conv(x))
        x = self.prelu(self.conv2(x))
        x = F.leaky_relu(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1), 0.2)
        return self.fc(x)


class PreActivation(nn.Module):
    """Affine maps where no conv / linear layer feeds them: BatchNorm after an addition and after a concatenation,
    F.batch_norm with running statistics, a layer scale by a reshaped parameter; ShuffleNet's channel shuffle
    (arithmetic on sizes, torch.transpose) and an assertion on the input's rank."""

    def __init__(self, in_channels=1, num_classes=10, width=8):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 3, padding=1)
        self.conv = nn.Conv2d(width, width, 3, padding=1)
        self.bn_after_add = nn.BatchNorm2d(width)
        self.bn_after_cat = nn.BatchNorm2d(2 * width)
        self.register_buffer("mean", torch.linspace(-0.5, 0.5, 2 * width))
        self.register_buffer("var", torch.linspace(0.5, 2.0, 2 * width))
        self.gamma = nn.Parameter(torch.linspace(0.1, 1.0, 2 * width))
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        torch._assert(x.ndim == 4, "expected images")
        x = self.stem(x)
        y = self.bn_after_add(x + self.conv(x)).relu()
        z = self.bn_after_cat(torch.cat([x, y], 1))
        z = F.relu(F.batch_norm(z, self.mean, self.var, training=self.training))
        batch, channels, height, width = z.size()
        groups = 2
        z = z.view(batch, groups, channels // groups, height, width)
        z = torch.transpose(z, 1, 2).contiguous().view(batch, -1, height, width)
        z = z * self.gamma.view(-1, 1, 1) + 0.1
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(z, 1), 1))


class Depthwise(nn.Module):
    """A depthwise-separable block: its first neurons feed a 3 x 3 depthwise conv (groups = channels)."""

    def __init__(self, in_channels=1, num_classes=10, width=16):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.depthwise = nn.Conv2d(width, width, 3, padding=1, groups=width)
        self.relu2 = nn.ReLU()
        self.pointwise = nn.Conv2d(width, width, 1)
        self.relu3 = nn.ReLU()
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        x = self.relu2(self.depthwise(self.relu1(self.stem(x))))
        x = self.relu3(self.pointwise(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class Functional(nn.Module):
    """Weight layers written as functions of the model's own parameters: F.conv2d (strided, then depthwise) and
    F.linear."""

    def __init__(self, in_channels=1, num_classes=10, width=8):
        super().__init__()
        self.conv_weight = nn.Parameter(torch.randn(width, in_channels, 3, 3) * 0.3)
        self.conv_bias = nn.Parameter(torch.randn(width) * 0.1)
        self.depthwise_weight = nn.Parameter(torch.randn(width, 1, 3, 3) * 0.3)
        self.fc_weight = nn.Parameter(torch.randn(num_classes, width) * 0.3)
        self.width = width

    def forward(self, x):
        x = F.relu(F.conv2d(x, self.conv_weight, self.conv_bias, stride=2, padding=1))
        x = F.relu(F.conv2d(x, self.depthwise_weight, padding=1, groups=self.width))
        return F.linear(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1), self.fc_weight)
