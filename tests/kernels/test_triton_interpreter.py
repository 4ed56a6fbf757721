"""Runs tests/kernels/test_triton_kernels.py in a fresh process with TRITON_INTERPRET=1 (CPU only).

The variable must be set before triton is first imported in a process (see that file), which
cannot be guaranteed inside a pytest session that also runs other tests.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the cases run compiled, in-process")
def test_triton_cases_under_the_interpreter():
    cases = Path(__file__).with_name("test_triton_kernels.py")
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(cases)],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and "failed" not in r.stdout, r.stdout[-2000:]
