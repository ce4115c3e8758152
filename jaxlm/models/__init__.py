"""The Flax modules: layers, the three Transformer stacks, task heads and LoRA."""
