"""The triton engine's kernel, checked bit for bit against IFNeuron and the reference engine under Triton's
interpreter on the CPU. The interpreter must be on before Triton is first imported, and this process has imported
it already (torch does), so tests/simulation/triton_checks.py runs in a process of its own."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

CHECKS = Path(__file__).with_name("triton_checks.py")


def test_the_fused_kernel_gives_the_neurons_and_the_references_results_under_the_interpreter():
    pytest.importorskip("triton")
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(CHECKS)],
                          env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True,
                          cwd=CHECKS.parent.parent)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    summary = done.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary and "failed" not in summary, summary
