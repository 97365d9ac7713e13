"""Baselines MoCaE is compared with in the same run (DESIGN.md section 6).

Each builder returns something the evaluation harness scores like any other system: a
transformers/peft causal LM (or a wrapper that behaves like one) and its tokenizer.
"""
