"""Expert training data-parallel over two CPU processes (gloo), started by ``accelerate launch``."""

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
FIXTURE_DATA = HERE.parent / "fixtures" / "data"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# What `accelerate launch` reads instead of a user's own default config (the test is hermetic).
# MULTI_GPU is accelerate's name for its torch.distributed.run launcher; on a machine without
# GPUs each process' Accelerator finds no CUDA and runs MULTI_CPU with gloo. Its CPU launcher
# (`--cpu`, or a MULTI_CPU config) starts a single process unless mpirun is given a hostfile.
ACCELERATE_CONFIG = """\
compute_environment: LOCAL_MACHINE
distributed_type: MULTI_GPU
num_processes: 2
num_machines: 1
machine_rank: 0
main_process_ip: 127.0.0.1
mixed_precision: 'no'
use_cpu: false
debug: false
"""


@pytest.mark.slow
def test_two_cpu_processes_train_one_expert_and_agree_on_its_weights(tmp_path):
    """``accelerate launch --multi_gpu --num_processes 2`` on a CPU machine: two gloo ranks, and
    train_expert is called exactly as in one process."""
    from safetensors.torch import load_file

    from mocae.experts.train import expert_dir

    spec = importlib.util.spec_from_file_location("ddp_worker", HERE / "ddp_worker.py")
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)

    reports = tmp_path / "reports"
    reports.mkdir()
    config = tmp_path / "accelerate.yaml"
    config.write_text(ACCELERATE_CONFIG)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MOCAE_DEVICE": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch",  # `accelerate launch`
                           "--config_file", str(config), "--multi_gpu", "--num_processes", "2",
                           "--main_process_port", str(_free_port()),
                           str(HERE / "ddp_worker.py"), str(tmp_path / "experts"), str(FIXTURE_DATA), str(reports)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((reports / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2] and ranks[0]["steps"] > 0
    assert [r["backend"] for r in ranks] == ["gloo", "gloo"]
    assert ranks[0]["digest"] == ranks[1]["digest"]  # DDP kept the replicas identical
    out = expert_dir(worker.CONFIG, tmp_path / "experts", FIXTURE_DATA)
    assert proc.stdout.count(f"saved {out}") == 2  # both ranks return the one folder
    record = json.loads((out / "training.json").read_text())
    assert record["steps"] == ranks[0]["steps"]
    saved = load_file(str(out / "adapter_model.safetensors"))
    assert worker.digest(saved) == ranks[0]["digest"]  # what rank 0 wrote is what every rank trained
