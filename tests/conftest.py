"""Test-wide setup. Order matters: both lines below must run before anything imports the modules."""
import os

# Triton kernels run on CPU through the interpreter; it must be set before kernels are imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
# The loaders' default backend is "auto" (measured per part, exports ONNX on first load); tests pin
# torch unless they ask for another backend (tests/test_backend_default.py checks the default itself).
os.environ.setdefault("MMFAST_BACKEND", "torch")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests import torchvision_shim  # noqa: E402,F401  (open_clip imports torchvision)

torch.manual_seed(0)

# Importing min_dalle switches autograd off and sets the thread count for the whole process; import it
# once here and put both back, so a test that imports it cannot change the tests that run after it.
_grad, _threads = torch.is_grad_enabled(), torch.get_num_threads()
try:
    import min_dalle  # noqa: E402,F401
except ImportError:
    pass
torch.set_grad_enabled(_grad)
torch.set_num_threads(_threads)


@pytest.fixture
def one_thread():
    """torch on one thread for the test: tiny models lose more to thread hand-offs than they gain on
    a busy 2-vCPU machine. Folders of tiny-model tests use it autouse in their conftest."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
