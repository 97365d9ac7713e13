"""One rank of ``test_distributed.py``: trains the tiny expert and records the LoRA weights it ends with.

Started by ``accelerate launch`` (its torch.distributed.run launcher): ``ddp_worker.py ROOT DATA_DIR REPORT_DIR``.
"""

import hashlib
import json
import sys
from pathlib import Path

import torch
from transformers import TrainerCallback

from mocae.experts.config import ExpertConfig
from mocae.experts.train import train_expert


def digest(tensors: dict) -> str:
    """sha256 over the tensors' names and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode() + tensors[name].detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()


class RecordWeights(TrainerCallback):
    """Writes ``rank<r>.json``: this rank's world size, backend, steps and the digest of its LoRA weights."""

    def on_train_end(self, args, state, control, model=None, **kwargs):
        dist = torch.distributed
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        backend = dist.get_backend() if dist.is_initialized() else None
        lora = {n.replace(".default", ""): p for n, p in model.named_parameters() if "lora_" in n}
        Path(sys.argv[3], f"rank{rank}.json").write_text(json.dumps(
            {"world_size": world, "backend": backend, "steps": state.global_step, "digest": digest(lora)}))


CONFIG = ExpertConfig(axis="helpful", backbone="tiny-random", rank=4, alpha=8, max_examples=8, max_length=64,
                      batch_size=1, epochs=1, save_steps=100, bf16=False, learning_rate=1e-2)

if __name__ == "__main__":
    out = train_expert(CONFIG, root=Path(sys.argv[1]), data_dir=Path(sys.argv[2]), progress=False,
                       callbacks=[RecordWeights()])
    print(f"saved {out}", flush=True)
