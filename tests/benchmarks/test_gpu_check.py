"""benchmarks/gpu_check.py: without a GPU it says so in one message and writes nothing."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the check would run")
def test_gpu_check_without_a_gpu_exits_with_a_clear_message(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--out", str(out),
                           "--run-dir", str(tmp_path / "run")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "gpu_check: no CUDA GPU found" in proc.stderr and "run it on a machine with one" in proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists() and not (tmp_path / "run").exists()
