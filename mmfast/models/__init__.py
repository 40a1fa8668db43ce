"""Readable PyTorch modules, weight-compatible with the checkpoints mmfast reads."""
