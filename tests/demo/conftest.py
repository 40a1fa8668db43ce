"""The shipped demo models, loaded once per session (fp32, PyTorch, CPU)."""
import pytest
import torch

import mmfast


@pytest.fixture(scope="session")
def demo():
    n = torch.get_num_threads()
    torch.set_num_threads(min(n, 2))
    clip = mmfast.load_clip("demo", device="cpu", dtype="fp32", backend="torch")
    vq = mmfast.load_vq("demo", device="cpu", dtype="fp32", backend="torch")
    gen = mmfast.load_generator("demo", device="cpu", dtype="fp32", backend="torch")
    yield clip, vq, gen
    torch.set_num_threads(n)
