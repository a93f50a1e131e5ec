"""snnbench as a library: train a small network on scikit-learn's digits, convert it with AugMapping, simulate
it and print the accuracy at every time step. Runs offline in seconds: python examples/api.py"""

import torch
from sklearn.datasets import load_digits
from torch import nn

import snnbench

digits = load_digits()
images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16  # [1797, 1, 8, 8] in [0, 1]
labels = torch.tensor(digits.target)
train_images, train_labels = images[:1400], labels[:1400]
test_batches = [(images[i:i + 100], labels[i:i + 100]) for i in range(1400, len(images), 100)]

torch.manual_seed(0)
model = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))
optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
for _ in range(100):  # full-batch training, a second on a CPU
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(train_images), train_labels).backward()
    optimizer.step()

# the method by name with knobs as keyword arguments, or as an object: snnbench.methods.AugMapping(c_max=4)
conversion = snnbench.convert(model, "augmapping", train_images[:512], T=8, c_max=4)
result = snnbench.simulate(conversion, test_batches)
print(result.accuracy[["t", "accuracy", "events_per_image", "sops_per_image"]].to_string(index=False))
print(f"ANN {result.summary['ann_accuracy']:.2%}, SNN {result.summary['snn_accuracy']:.2%} at T = 8; energy per "
      f"image: ANN {result.summary['energy_ann_uj']:.4f} uJ, SNN {result.summary['energy_snn_uj']:.4f} uJ")
print(snnbench.inspect(model, input_shape=(1, 8, 8)).layers.to_string(index=False))
