"""Engines that run a model's towers besides eager PyTorch (same inputs, same outputs)."""
