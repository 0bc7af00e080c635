"""A CPU stand-in for CUDA graph capture, for tests: ``DecodeGraphs(..., graph_api=RecordingGraphs())``.

A CUDA graph keeps the kernels launched during capture, with their arguments as they were then: the
tensors at their addresses and every Python value (sizes, grid shapes, numbers read from the host)
frozen. Replaying it runs no Python at all. Running the static buffers eagerly on CPU (``capture=False``)
re-executes the forward's Python each step, so it cannot show a forward that reads a host value which
changes between steps. This recorder can: during capture it records every op the dispatcher sees (aten
ops and the project's C++ ops) with its arguments; ``replay()`` re-runs that list and nothing else.

- A tensor made during the capture stands for the op that made it: at replay it is the result of that
  op's replay.
- Any other tensor (static input buffers, weights, the KV pool, the logits buffer) is used as is, by
  reference, so it is read with the contents it has at replay time and written in place.
- Every other argument (ints, floats, lists of ints, dtypes) is the value it had during the capture.

Ops that need the host to wait for the device (``.item()``, ``nonzero``, ``masked_select``, ...) raise
during the capture, as they do inside a CUDA capture; ``torch.cuda.is_current_stream_capturing()`` says
True meanwhile, so code that checks it (transformers' ``is_tracing()``) takes its capture path.

Not covered: work outside the dispatcher (a Triton kernel in its interpreter, numpy on a tensor's
memory) is not recorded, so Triton-interpreter forwards cannot be replayed this way; and on CUDA, CPU
tensor work during capture runs once and is not captured, which on CPU cannot be told apart.
"""
from __future__ import annotations

import contextlib

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# Ops whose result (or whose output size) the host must read from the device: illegal in a CUDA capture.
HOST_SYNC_OPS = {aten.item.default, aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
                 aten.equal.default, aten.is_nonzero.default, aten._unique2.default, aten.unique_dim.default,
                 aten.unique_consecutive.default, aten.repeat_interleave.Tensor}


class HostSyncInCapture(RuntimeError):
    pass


class RecordedGraph:
    def __init__(self) -> None:
        self.ops: list[tuple] = []  # (op, args, kwargs, output) as the capture ran it
        self.replays = 0

    def replay(self) -> None:
        made: dict[int, object] = {}  # id(tensor made during capture) -> its replayed value

        def arg(x):
            return made.get(id(x), x) if isinstance(x, torch.Tensor) else x

        with torch.inference_mode():
            for op, args, kwargs, out in self.ops:
                new = op(*pytree.tree_map(arg, args), **pytree.tree_map(arg, kwargs))
                for old, val in zip(pytree.tree_leaves(out), pytree.tree_leaves(new)):
                    if isinstance(old, torch.Tensor):
                        made[id(old)] = val
        self.replays += 1


class SyncWatch(TorchDispatchMode):
    """Collects (in ``seen``) the host-syncing ops run while it is active, without stopping them."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in HOST_SYNC_OPS:
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


class _Recorder(TorchDispatchMode):
    def __init__(self, graph: RecordedGraph) -> None:
        super().__init__()
        self.graph = graph

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in HOST_SYNC_OPS:
            raise HostSyncInCapture(f"{func} makes the host wait for the device: not allowed in a CUDA graph capture")
        out = func(*args, **kwargs)
        self.graph.ops.append((func, args, kwargs, out))  # keeps the capture's tensors alive: their ids stay unique
        return out


class RecordingGraphs:
    """The ``graph_api`` of :class:`hf_paged.engine.graphs.DecodeGraphs`, recording on CPU."""

    def __init__(self) -> None:
        self.graphs: list[RecordedGraph] = []

    def session(self, device: torch.device):
        return contextlib.nullcontext()

    def supports(self, device: torch.device) -> bool:
        return device.type == "cpu"

    def synchronize(self, device: torch.device) -> None:
        pass

    def pool(self) -> None:
        return None

    def new_graph(self) -> RecordedGraph:
        self.graphs.append(RecordedGraph())
        return self.graphs[-1]

    @contextlib.contextmanager
    def capturing(self, graph: RecordedGraph, pool: None):
        # Code that asks (transformers' is_tracing() does) is told a CUDA stream is capturing, as it would be.
        real = torch.cuda.is_current_stream_capturing
        torch.cuda.is_current_stream_capturing = lambda: True
        try:
            with _Recorder(graph):
                yield
        finally:
            torch.cuda.is_current_stream_capturing = real
