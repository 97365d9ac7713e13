"""A tiny random BERT with a word-piece tokenizer, built in memory: the judges' test encoder.

Tests (and quick smoke runs) pass its folder as ``encoder=`` so no real model is loaded.
"""

from __future__ import annotations

import re
from pathlib import Path

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def build_tiny_encoder(folder: Path, texts: list[str] = (), hidden: int = 32, layers: int = 2) -> Path:
    """Write a random BERT (``hidden`` wide, ``layers`` deep) and a tokenizer over ``texts``' words.

    Args:
        folder: where to write it (created).
        texts: words of these texts (lowercased) make the vocabulary, plus letters and digits.

    Returns:
        ``folder``, loadable with ``mocae.evaluation.judges.encoder.load_encoder``.
    """
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    words = sorted({w for t in texts for w in re.findall(r"\w+|[^\w\s]", t.lower())})
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789.,!?'")
    vocab = list(dict.fromkeys(SPECIAL + chars + words))
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True)
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=2, intermediate_size=2 * hidden, max_position_embeddings=128)
    BertModel(config).save_pretrained(folder)
    return folder
