#!/usr/bin/env bash
# Run HERE (no GPU needed, the package index reachable) before scripts/gpu_bench.sh runs on a lent device: copies
# what the device cannot fetch into two git-ignored folders that the device call carries (about 45 MB in all):
#   outputs/gpu_data    MNIST (the .gz files), CIFAR-10 cut to 2,000 images per training batch and 1,000 test
#                       images (10,000 to train on, the VGG-11 bench's train.num_samples), the ResNet-20 weights
#   outputs/gpu_wheels  the Python packages snnbench needs that the device image lacks (Hydra, OmegaConf,
#                       SpikingJelly and their pure-Python needs), as wheels
# Then, with the device tool:  run(command="bash scripts/gpu_bench.sh", timeout_s=600,
#                                  carry=["outputs/gpu_data", "outputs/gpu_wheels"])
set -euo pipefail
cd "$(dirname "$0")/.."
shared=${SHARED_DATA:-../shared/data}
data=outputs/gpu_data
wheels=outputs/gpu_wheels
rm -rf "$data" "$wheels"
mkdir -p "$data/MNIST/raw" "$data/cifar-10-batches-py" "$data/pretrained" "$wheels"
cp "$shared"/MNIST/raw/*.gz "$data/MNIST/raw/"
cp "$shared/pretrained/resnet20-12fca82f.th" "$data/pretrained/"
cp "$shared/cifar-10-batches-py/batches.meta" "$data/cifar-10-batches-py/"
.venv/bin/python - "$shared/cifar-10-batches-py" "$data/cifar-10-batches-py" <<'PY'
import pickle
import sys
from pathlib import Path

source, target = map(Path, sys.argv[1:])
for name, keep in [*((f"data_batch_{i}", 2000) for i in range(1, 6)), ("test_batch", 1000)]:
    with open(source / name, "rb") as f:
        batch = pickle.load(f, encoding="latin1")
    cut = {key: value[:keep] if key in ("data", "labels", "filenames") else value for key, value in batch.items()}
    with open(target / name, "wb") as f:
        pickle.dump(cut, f, protocol=4)
PY
# pure-Python packages: wheels built or fetched here install on the device's Python 3.12 as they are
.venv/bin/pip wheel -q --no-deps -w "$wheels" hydra-core==1.3.8 omegaconf==2.3.1 antlr4-python3-runtime==4.9.3 \
    spikingjelly==2.0.0 loguru==0.7.3
du -sh "$data" "$wheels"
