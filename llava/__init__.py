"""LLaVA alt-text toolkit: SFT, DPO and MCM-DPO on transformers' native LLaVA classes."""

__version__ = "0.1.0"
