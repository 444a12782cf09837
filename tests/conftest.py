"""Shared test set-up: Hypothesis profiles and the `gpu` marker.

Profiles: ``ci`` (default, fast) and ``thorough`` (many more examples); pick one with
``NSA_FLEX_HYPOTHESIS=thorough pytest``.
"""

import importlib.util
import os
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
settings.register_profile(
    "thorough", max_examples=300, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("NSA_FLEX_HYPOTHESIS", "ci"))

# Without CUDA, Triton kernels (where triton is installed) run under its interpreter; the switch is read when
# triton is first imported, so it is set before any test can import it.
if not torch.cuda.is_available() and importlib.util.find_spec("triton") is not None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def fresh_dynamo_for_gpu_tests(request):
    """Each GPU test starts with dynamo's caches empty, so compiled kernels of earlier tests (one per mask and
    shape) never add up to nsa_flex's recompile limit; CPU tests don't compile and skip the reset."""
    if "gpu" in request.keywords and torch.cuda.is_available():
        torch._dynamo.reset()
    yield


@pytest.fixture(scope="session")
def triton_device():
    """Where the Triton kernel tests run: "cuda", or "cpu" under Triton's interpreter; skips without triton.

    Only cases that launch a kernel should ask for it: CI installs no triton, so a torch-path case asking for it
    would never run there (test_cache_update.py's ``device`` fixture picks per case)."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        return "cuda"
    assert os.environ.get("TRITON_INTERPRET") == "1", "set above: triton runs interpreted without CUDA"
    _index_scalars_in_interpreter()
    return "cpu"


def _index_scalars_in_interpreter():
    """Triton 3.6's interpreter turns a loop bound into ``int(array of shape (1,))``, an error since NumPy 2.4."""
    from triton.runtime import interpreter

    patch = interpreter._patch_lang_tensor
    if getattr(patch, "nsa_flex_fixed", False):
        return

    def fixed(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    fixed.nsa_flex_fixed = True
    interpreter._patch_lang_tensor = fixed


@pytest.fixture
def one_thread():
    """Run the test with one intra-op thread, restoring the previous setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A tiny corpus of 24 Python files for the training-script tests (single process and distributed)."""
    root = tmp_path_factory.mktemp("corpus")
    for i in range(24):
        (root / f"m{i:02d}.py").write_text(f"def f{i}(x):\n    return x * {i} + {i * i}\n" * 20)
    return root
