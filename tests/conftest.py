import os

# Triton must see TRITON_INTERPRET before its first import (transformers imports it): the kernels run
# in Triton's interpreter on CPU unless the CUDA kernel tests were asked for.
if os.environ.get("HF_PAGED_TEST_CUDA") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import gc  # noqa: E402

import pytest
import torch

from hf_paged.kv.blocks import live_allocators

# HF_PAGED_TEST_THREADS=1 keeps parallel test runs on a shared 2-core machine from oversubscribing it.
torch.set_num_threads(int(os.environ.get("HF_PAGED_TEST_THREADS", "2")))


@pytest.fixture(autouse=True)
def allocator_invariants():
    """After every test: each live allocator passes check() and holds no referenced block."""
    yield
    if any(a.num_used for a in live_allocators()):
        gc.collect()  # caches dropped without release() give their blocks back when collected
    for alloc in live_allocators():
        alloc.check()
        assert alloc.num_used == 0, f"{alloc.num_used} block(s) still referenced after the test"


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny_models")
