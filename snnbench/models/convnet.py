"""Plain feed-forward networks: conv-BN-ReLU stages with pooling, then FC-BN-ReLU layers (MLP, CNNs, VGG)."""

from torch import nn

from snnbench.models.normalize import Normalize


class ConvNet(nn.Module):
    """`layers`: channel counts of 3x3 conv-BN-ReLU blocks, "P" for 2x2 pooling; `hidden`: FC widths."""

    def __init__(self, layers, hidden, in_channels, image_size, num_classes, mean, std, pool="avg"):
        super().__init__()
        self.normalize = Normalize(mean, std)
        pooling = {"avg": nn.AvgPool2d, "max": nn.MaxPool2d}[pool]
        features, channels, size = [], in_channels, image_size
        for item in layers:
            if item == "P":
                features.append(pooling(2))
                size //= 2
            else:
                features += [nn.Conv2d(channels, int(item), 3, padding=1, bias=False),
                             nn.BatchNorm2d(int(item)), nn.ReLU()]
                channels = int(item)
        self.features = nn.Sequential(*features)
        classifier, width = [nn.Flatten()], channels * size * size
        for units in hidden:
            classifier += [nn.Linear(width, units, bias=False), nn.BatchNorm1d(units), nn.ReLU()]
            width = units
        classifier.append(nn.Linear(width, num_classes))
        self.classifier = nn.Sequential(*classifier)

    def forward(self, x):
        return self.classifier(self.features(self.normalize(x)))
