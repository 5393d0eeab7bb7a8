"""A CPU stand-in for ``torch.cuda.graph`` capture and replay, for testing graph users without a GPU.

What it keeps of a real CUDA graph: capturing records every operator (through a
``TorchDispatchMode``) and changes nothing (a real capture runs no kernels: every tensor that existed
before and was written during the capture is put back afterwards); a replay runs the recorded operators
again on the same tensors, writing each result into the tensor the capture produced, and runs no
Python of the captured code (so a host number read during capture is baked in, as on a GPU); a host
sync while capturing raises, as CUDA does. What it does not model: the memory pool (tensors made
while capturing never alias), stream semantics and the capture rules of particular kernels.

``install(monkeypatch)`` puts it in place of ``torch.cuda.CUDAGraph``, ``torch.cuda.graph`` and the
few ``torch.cuda`` calls a capture makes around it; ``answer_as_gpu(monkeypatch)`` makes the trainers'
graph check see a CUDA device. ``tests/graphs_on_cpu.py`` does both in a launched script's processes.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

#: operators that read a value back to the host: not allowed while a CUDA graph is being captured
SYNC_OPS = {"aten::_local_scalar_dense", "aten::is_nonzero", "aten::item", "aten::equal"}

_capturing = [False]


def _key(t: torch.Tensor) -> tuple:
    return t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride())


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[tuple[Any, tuple, dict, Any]] = []
        self.made: set[int] = set()  # storages created while capturing
        self.saved: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # older tensors written: their values

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func._schema.name in SYNC_OPS:
            raise RuntimeError(f"operation not permitted when stream is capturing ({func._schema.name})")
        for i, argument in enumerate(func._schema.arguments):
            if argument.alias_info is None or not argument.alias_info.is_write:
                continue
            value = args[i] if i < len(args) else kwargs.get(argument.name)
            for t in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.made:
                    self.saved.setdefault(_key(t), (t, t.detach().clone()))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.made.add(t.untyped_storage().data_ptr())
        self.ops.append((func, args, kwargs, out))
        return out


class EmulatedGraph:
    """What ``torch.cuda.CUDAGraph`` is for the code under test: filled by :func:`emulated_graph`, replayed."""

    def __init__(self):
        self.ops: list | None = None
        self.replays = 0

    def replay(self) -> None:
        self.replays += 1
        with torch.no_grad(), torch._C._AutoDispatchBelowADInplaceOrView():
            for func, args, kwargs, out in self.ops:
                new = func(*args, **kwargs)
                for recorded, got in zip(tree_flatten(out)[0], tree_flatten(new)[0]):
                    if isinstance(recorded, torch.Tensor) and recorded is not got \
                            and recorded.data_ptr() != got.data_ptr():
                        recorded.detach().copy_(got)


@contextlib.contextmanager
def emulated_graph(graph: EmulatedGraph, pool=None, capture_error_mode=None, **_):
    recorder = _Recorder()
    _capturing[0] = True
    try:
        with recorder:
            yield
        graph.ops = recorder.ops
    finally:
        _capturing[0] = False
        with torch.no_grad():  # a capture runs nothing: what existed before is as before
            for tensor, value in recorder.saved.values():
                tensor.detach().copy_(value)


def install(monkeypatch) -> None:
    """Replace the ``torch.cuda`` graph API with the emulation for one test."""
    monkeypatch.setattr(torch.cuda, "CUDAGraph", EmulatedGraph)
    monkeypatch.setattr(torch.cuda, "graph", emulated_graph)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: _capturing[0])


def answer_as_gpu(monkeypatch) -> None:
    """Let the trainers' graph check (``cuda_graphs.graph_blocker``) see a CUDA device; every other
    reason to stay eager still counts."""
    from types import SimpleNamespace

    from library.training import cuda_graphs

    real = cuda_graphs.graph_blocker

    def blocker(cfg, accelerator, method, fused=None):
        as_gpu = SimpleNamespace(device=torch.device("cuda"), num_processes=accelerator.num_processes,
                                 distributed_type=getattr(accelerator, "distributed_type", "NO"))
        return real(cfg, as_gpu, method, fused)
    monkeypatch.setattr(cuda_graphs, "graph_blocker", blocker)
