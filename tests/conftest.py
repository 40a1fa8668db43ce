"""Test-wide setup. Order matters: both lines below must run before anything imports the modules."""
import os

# Triton kernels run on CPU through the interpreter; it must be set before kernels are imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from tests import torchvision_shim  # noqa: E402,F401  (open_clip imports torchvision)

torch.manual_seed(0)
