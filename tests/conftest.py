import gc

import pytest
import torch

from hf_paged.kv.blocks import live_allocators

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def allocator_invariants():
    """After every test: each live allocator passes check() and holds no referenced block."""
    yield
    gc.collect()
    for alloc in live_allocators():
        alloc.check()
        assert alloc.num_used == 0, f"{alloc.num_used} block(s) still referenced after the test"


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny_models")
