"""Model layer: build, load, save and convert LLaVA checkpoints on transformers' native classes."""
