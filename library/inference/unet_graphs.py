"""The U-Net call of the denoising loop, replayed as a CUDA graph.

At 1024² a batched SDXL U-Net call (batch 2 for guidance) is about 40 ms of GPU work but some
2,500 kernel launches from Python, which take 70-100 ms on the host: generation is bound by the
host, not the GPU. A CUDA graph records the launches once and replays them with one call.

Graphs live for one sampling loop (:class:`LoopGraphs`, made by ``SDXLGenerator._denoise``): the
first U-Net call of a shape and hook state runs eagerly (warming up cuBLAS/cuDNN and any compiled
regions), the second is captured and every later one replays. Everything a replay reads that is
not an input of the call (LoRA multipliers, ControlNet-LLLite's embedded guide images, the weights)
stays fixed during a loop, so no graph can see stale state: between loops (the next prompt, a
changed multiplier, the second stage of the highres fix) the graphs are dropped. What may change
inside a loop is part of the key: the input shapes (Gradual Latent grows the latent) and each
hook's :meth:`graph_key` (ControlNet-LLLite switching off after ``--control_net_ratios``).

Not graphed (eager, as before): a CPU device, a hook without a ``graph_key`` method (its effect on
the U-Net is unknown), a hook that passes extra U-Net arguments, and whatever the caller turns off
(Deep Shrink resizes inside the U-Net by timestep). A failed capture logs one line and the loop
continues eagerly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch

from library.errors import first_error

logger = logging.getLogger(__name__)

#: most graphs per loop (each distinct shape / hook state holds its own input and output tensors)
MAX_GRAPHS = 8


def hooks_key(hooks: Sequence[Any]) -> tuple | None:
    """The combined :meth:`graph_key` of the U-Net hooks after they ran, or None if one has none."""
    keys = []
    for hook in hooks:
        key_fn = getattr(hook, "graph_key", None)
        if key_fn is None:
            return None
        keys.append(key_fn())
    return tuple(keys)


class LoopGraphs:
    """``call(inputs) -> tensor`` (no gradients), replayed as CUDA graphs for the calls of one loop.

    ``inputs`` are the tensors that change from call to call; ``call`` must read nothing else that
    changes within the loop except what ``state_key`` of :meth:`__call__` describes.
    """

    def __init__(self, call: Callable[[dict[str, torch.Tensor]], torch.Tensor]):
        self.call = call
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, dict[str, torch.Tensor], torch.Tensor]] = {}
        self.seen: set[tuple] = set()
        self.pool = torch.cuda.graph_pool_handle()
        self.failed = False
        self.replays = 0

    def __call__(self, inputs: dict[str, torch.Tensor], state_key: tuple) -> torch.Tensor:
        key = (state_key, tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(inputs.items())))
        entry = self.graphs.get(key)
        if entry is None and not self.failed and key in self.seen and len(self.graphs) < MAX_GRAPHS:
            entry = self._capture(key, inputs)
        if entry is None:
            self.seen.add(key)
            with torch.no_grad():
                return self.call(inputs)
        graph, static, output = entry
        for name, tensor in inputs.items():
            static[name].copy_(tensor, non_blocking=True)
        graph.replay()
        self.replays += 1
        return output.clone()  # the next replay overwrites the graph's own output

    def _capture(self, key: tuple, inputs: dict[str, torch.Tensor]):
        static = {k: v.clone() for k, v in inputs.items()}
        graph = torch.cuda.CUDAGraph()
        try:
            torch.cuda.synchronize()
            with torch.no_grad(), torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                output = self.call(static)
        except Exception as exc:
            logger.warning("CUDA graph capture of the U-Net failed (%s); this loop continues eagerly", first_error(exc))
            logger.debug("CUDA graph capture failure", exc_info=exc)
            self.failed = True
            return None
        self.graphs[key] = (graph, static, output)
        return self.graphs[key]
