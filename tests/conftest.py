import os

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    """GPU tests skip cleanly on machines without CUDA."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_configure(config):
    """Without a GPU, the Triton kernels run (and are tested) in Triton's
    interpreter, which must be switched on before any kernel is defined."""
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def fixed_seed():
    """The global RNG seeded with 0 for the test (module constructors draw from
    it), and its state restored afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        yield


@pytest.fixture
def one_thread():
    """Tiny tensors: one thread is faster than waking a pool for each op.

    The block tests opt in per module: ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(params=["C walk", "Python walk"])
def each_module_walk(request, monkeypatch):
    """The test once with the module walk in C (csrc/walk.cpp) and once with
    the Python walk it stands in for (which also runs where the extension is
    not built)."""
    from fusedconv import model_index
    from fusedconv.kernels import extension

    if request.param == "Python walk":
        monkeypatch.setattr(model_index, "native_function", lambda name: None)
    elif extension.native_function("walk_modules") is None:
        pytest.skip("the extension (with its C walk) is not built")
    return request.param
