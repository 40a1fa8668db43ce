"""One set of tiny runtime objects for the folder (building them costs ~0.5 s), on one torch thread:
the threads of the tests are the parallelism, and 2 vCPUs are shared."""
import pytest

from tests.reliability import workload


@pytest.fixture(scope="module")
def models():
    return workload.build()


@pytest.fixture(autouse=True)
def _one_torch_thread(one_thread):
    pass
