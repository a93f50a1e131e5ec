"""How the spiking networks of torchvision's classification zoo approach their ANN as T grows.

For every family of tests/core/test_zoo.py (one small member each, the same member, input side and options, random
weights seeded, num_classes=10, BatchNorm statistics randomised as the tests do): convert with the baseline method
(v0=0.5: rounding), max pooling as average pooling, calibrated by the maximum (percentile 100) on a few random
images, convert.nonlinear=compensate for the families that need it; then simulate the spiking network on 4 other
random images and compare its mean output up to T (accumulated output / T) with the canonical ANN's logits at
T = 16, 64, 256: max|SNN - ANN| / max|ANN| and the argmax agreement. The event-driven share is summary.json's, from
snnbench.simulate at a small T. A family is refused in one line (the reason recorded) or, past --limit-s seconds,
not measured.

    .venv/bin/python scripts/zoo_convergence.py --out zoo_convergence.md [--families resnet vgg] [--limit-s 600]
        [--steps 16 64 256 1024] [--chunk 16]
"""

import argparse
import signal
import sys
import time
import traceback
from pathlib import Path

import torch
import torchvision

import snnbench
from snnbench.core.stepped import Stepped
from snnbench.errors import UserError

# one table of families for the test and this script: tests/core/test_zoo.py's
TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path[:0] = [str(TESTS), str(TESTS / "core")]
from networks import randomised  # noqa: E402
from test_zoo import FAMILIES, NONLINEAR  # noqa: E402

STEPS = (16, 64, 256)  # the T at which the outputs are compared, by default
SHARE_T = 16  # the T of the simulation (snnbench.simulate) that measures the event-driven share
CALIBRATION_IMAGES = 8
TEST_IMAGES = 4


def columns(steps) -> list[str]:
    return ["family", "member", "input", "status", "event_driven_share", *(f"error_T{T}" for T in steps),
            f"argmax_agreement_T{steps[-1]}", "seconds", "reason"]


class TookTooLong(Exception):
    pass


def _alarm(signum, frame):
    raise TookTooLong


@torch.inference_mode()
def mean_outputs_at(snn, images: torch.Tensor, checkpoints, chunk: int) -> dict[int, torch.Tensor]:
    """The spiking network's output summed up to each checkpoint T and divided by T, the images given at every
    step, simulated `chunk` steps per forward (folded into the batch dimension)."""
    total = checkpoints[-1]
    for module in snn.modules():
        if isinstance(module, Stepped):
            module.declare_constant_inputs(())
            module.begin(total)
    accumulated, means = 0, {}
    for start in range(0, total, chunk):
        steps = min(chunk, total - start)
        for module in snn.modules():
            if isinstance(module, Stepped):
                module.next_chunk(steps)
        outputs = snn(images.repeat(steps, 1, 1, 1)).view(steps, len(images), -1).cumsum(0) + accumulated
        accumulated = outputs[-1]
        for T in checkpoints:
            if start < T <= start + steps:
                means[T] = outputs[T - start - 1] / T
    return means


def measure(name: str, steps: list[int], chunk: int) -> dict:
    member, side, options = FAMILIES[name]
    row = {"family": name, "member": member, "input": f"{side}x{side}"}
    torch.manual_seed(0)
    model = randomised(getattr(torchvision.models, member)(num_classes=10, **options))
    generator = torch.Generator().manual_seed(1)
    calibration_images = torch.rand(CALIBRATION_IMAGES, 3, side, side, generator=generator)
    images = torch.rand(TEST_IMAGES, 3, side, side, generator=generator)
    nonlinear = "compensate" if name in NONLINEAR else "refuse"
    try:
        converted = snnbench.convert(model, "baseline", calibration_images, T=steps[-1], percentile=100,
                                     maxpool="avg", nonlinear=nonlinear, v0=0.5)
    except UserError as refusal:
        return {**row, "status": "refused", "reason": str(refusal)}
    row["status"] = "with analog operators" if converted.analog else "exact"
    with torch.inference_mode():
        logits = converted.ann(images)
    means = mean_outputs_at(converted.snn, images, steps, chunk)
    scale = logits.abs().max().item()
    for T in steps:
        row[f"error_T{T}"] = (means[T] - logits).abs().max().item() / scale
    last = steps[-1]
    row[f"argmax_agreement_T{last}"] = (means[last].argmax(1) == logits.argmax(1)).float().mean().item()
    result = snnbench.simulate(converted, [(images, logits.argmax(1))], T=SHARE_T, engine="torch")
    row["event_driven_share"] = result.summary["event_driven_share"]
    return row


def markdown(rows: list[dict], steps) -> str:
    def cell(value):
        return f"{value:.4g}" if isinstance(value, float) else str(value).replace("|", "\\|")
    names = columns(steps)
    lines = ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
    lines += ["| " + " | ".join(cell(row.get(column, "")) for column in names) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write(rows: list[dict], steps, out: Path):
    if out.suffix == ".md":
        out.write_text(markdown(rows, steps))
    else:
        import pandas as pd
        pd.DataFrame(rows, columns=columns(steps)).to_csv(out, index=False)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("zoo_convergence.md"), help=".md: a markdown table; else CSV")
    parser.add_argument("--families", nargs="+", choices=sorted(FAMILIES), default=list(FAMILIES))
    parser.add_argument("--limit-s", type=int, default=600, help="a family that takes longer is not measured")
    parser.add_argument("--steps", type=int, nargs="+", default=list(STEPS), help="the T to compare at")
    parser.add_argument("--chunk", type=int, default=16, help="time steps per forward")
    args = parser.parse_args()
    steps = sorted(set(args.steps))
    torch.set_num_threads(1)  # the CPU is shared
    signal.signal(signal.SIGALRM, _alarm)
    rows = []
    for name in args.families:
        start = time.perf_counter()
        signal.alarm(args.limit_s)
        try:
            row = measure(name, steps, args.chunk)
        except TookTooLong:
            member, side, _ = FAMILIES[name]
            row = {"family": name, "member": member, "input": f"{side}x{side}", "status": "not measured",
                   "reason": f"took more than {args.limit_s} s on one CPU thread"}
        except Exception as error:  # an internal error is a finding to report, not a reason to stop the others
            member, side, _ = FAMILIES[name]
            traceback.print_exc()
            row = {"family": name, "member": member, "input": f"{side}x{side}", "status": "failed",
                   "reason": f"{type(error).__name__}: {error}".splitlines()[0]}
        finally:
            signal.alarm(0)
        row["seconds"] = round(time.perf_counter() - start, 1)
        rows.append(row)
        print(markdown([row], steps).splitlines()[-1], flush=True)
        write(rows, steps, args.out)  # after every family, so that a run cut short leaves what it measured


if __name__ == "__main__":
    main()
