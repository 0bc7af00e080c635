"""A few requests of tests/server_diff.py: each route's answer streamed equals it not streamed, and greedy
answers do not change when every request runs at once; ``python tests/server_diff.py --requests N`` runs more."""
from __future__ import annotations

import random

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from server_diff import check, make_requests  # noqa: E402
from served import serving, tiny_chat_pipeline  # noqa: E402


def test_random_requests_streamed_and_not_and_at_once_agree():
    pipe = tiny_chat_pipeline(max_model_len=512, kv_memory="64MiB", max_num_seqs=16)
    try:
        with serving(pipe) as srv:
            problems = check(srv.url, make_requests(random.Random(0), 24))
    finally:
        pipe.close()
    assert not problems, "\n".join(problems[:5])
