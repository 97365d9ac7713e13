"""Stage 1 experts: per-axis LoRA adapters, their training and their task vectors."""
