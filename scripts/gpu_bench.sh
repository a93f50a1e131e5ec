#!/usr/bin/env bash
# The GPU bench of docs/performance.md on one lent device, in one go (meant to end within about 8 minutes on one
# H200; each part has its own time limit and the script stops starting parts after 8 minutes). Prepare first, here:
# `bash scripts/gpu_bench_prepare.sh`; then with the device tool:
#     run(command="bash scripts/gpu_bench.sh", timeout_s=600, carry=["outputs/gpu_data", "outputs/gpu_wheels"])
# What comes back under $OUT: summary.txt (the tables, in the order run) and gpu_bench.tar.gz (every bench's CSV and
# full log, the kernel's bit-for-bit checks on the GPU, the environment). In order, most important first:
#   1. tests/triton_checks.py on the GPU: the compiled kernel against IFNeuron and the reference engine, every case
#   2. MNIST CNN (T = 64), VGG-11 (T = 32), ResNet-20 (T = 64, pretrained) at batch 64, then the same at batch 256:
#      the triton and torch engines, the reference, the dense floor and SpikingJelly, alternated
#   3. the chunk of steps for the triton engine (MNIST CNN, batch 64): 8, 16, 64 (32 is the default, in 2.)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-outputs/gpu_bench}
work=$(mktemp -d)
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    outputs/gpu_wheels/*.whl \
    || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
export SNNBENCH_DATA=$PWD/outputs/gpu_data SNNBENCH_CACHE=$work/cache
{ nvidia-smi -L; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  nproc; git log --oneline -1; } > "$work/environment.txt" 2>&1

part() {  # part NAME LIMIT_SECONDS COMMAND...: run unless 8 minutes are gone; its output into NAME.txt
    local name=$1 limit=$2
    shift 2
    if ((SECONDS > 480)); then
        echo "== $name: not run (8 minutes gone)" >> "$out/summary.txt"
        return
    fi
    local start=$SECONDS
    timeout "$limit" "$@" > "$work/$name.txt" 2>&1
    local status=$?
    echo "== $name: exit $status, $((SECONDS - start)) s" >> "$out/summary.txt"
    grep -v -E "^\[|^ +[a-z_]+\.py:[0-9]+$" "$work/$name.txt" | tail -n 40 >> "$out/summary.txt"
}

bench() {  # bench NAME LIMIT_SECONDS OVERRIDES...
    local name=$1 limit=$2
    shift 2
    part "$name" "$limit" python3 -m snnbench bench device=cuda 'bench.engines=[triton,torch,reference,ann_floor,spikingjelly]' \
        bench.repeats=3 "$@" --out "$work/$name.csv"
}

mnist=(dataset=mnist train.epochs=1 sim.T=64)
vgg=(dataset=cifar10 dataset.verify=false model=vgg11 train.epochs=2 train.num_samples=10000 sim.T=32)
resnet=(dataset=cifar10 dataset.verify=false model=resnet20
        train.checkpoint=$SNNBENCH_DATA/pretrained/resnet20-12fca82f.th sim.T=64)

part triton_checks 120 python3 -m pytest -q -p no:cacheprovider -m '' tests/triton_checks.py
bench mnist_cnn_T64_b64 150 "${mnist[@]}" sim.batch_size=64
bench vgg11_T32_b64 150 "${vgg[@]}" sim.batch_size=64
bench resnet20_T64_b64 120 "${resnet[@]}" sim.batch_size=64
bench mnist_cnn_T64_b256 90 "${mnist[@]}" sim.batch_size=256
bench vgg11_T32_b256 90 "${vgg[@]}" sim.batch_size=256
bench resnet20_T64_b256 90 "${resnet[@]}" sim.batch_size=256
for chunk in 8 16 64; do
    part "mnist_cnn_T64_b64_chunk$chunk" 60 python3 -m snnbench bench device=cuda 'bench.engines=[triton,torch,ann_floor]' \
        bench.repeats=3 "${mnist[@]}" sim.batch_size=64 sim.chunk=$chunk --out "$work/mnist_cnn_T64_b64_chunk$chunk.csv"
done
tar czf "$out/gpu_bench.tar.gz" -C "$work" --exclude cache .
echo "== done in $SECONDS s" >> "$out/summary.txt"
