"""Test-wide setup. TRITON_INTERPRET must be set before any kernel module is imported: it is read
when `@triton.jit` decorates a function."""
import importlib.util
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Triton must be loaded before any test renders with MuJoCo: Mesa's llvmpipe brings its own LLVM, and
# importing Triton after it in the same process segfaults (the trainer renders in a child process).
if importlib.util.find_spec("triton") is not None:
    import triton  # noqa: F401


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
