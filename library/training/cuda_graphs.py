"""The U-Net forward, the loss and their backward, replayed as one CUDA graph per input shape.

At batch 1 an adapter step (LoRA, ControlNet-LLLite, textual inversion) launches some 10,000 small
kernels from Python; the GPU finishes each long before the host has issued the next, so the step
is bound by the host (a profile of LoRA dim 8 at 1024²: 1.4 s of host time per step against 0.12 s
of GPU time). A CUDA graph records those launches once and replays them with one call.

How a step runs here (:meth:`GraphedLoss.loss_and_backward`):

* the first batch of a shape runs eagerly (it also warms up cuBLAS, the compiled regions and the
  lazily built tables); the second is captured into a graph and every later one replays it;
* the inputs (noisy latents, timesteps, text conditioning, targets, ...) are copied into the
  graph's own input tensors and the loss comes out of the graph's own output tensor;
* parameter gradients are accumulated in place into one gradient buffer per trained parameter,
  which every graph (and every eager step once graphs exist) writes: the buffer is handed to the
  trainer as ``param.grad``, zeroed before a step that starts afresh and kept while gradients
  accumulate over several batches, so any number of bucket shapes cost one set of gradients;
* gradients for inputs that require them (the text encoders' outputs, when a text encoder or the
  textual-inversion vectors are trained) continue eagerly from the graph's input gradients, so the
  text encoders stay outside the graph;
* all graphs share one memory pool: their activations live only inside a replay, so several
  bucket shapes cost the memory of the largest one, not the sum.

Full fine-tuning is graphed too: the U-Net's gradients land in the buffers like an adapter's.
The optimizer can replay inside the graph as well, reading the numbers that change per step from
device tensors (``Adafactor.use_device_factors``), so no gradient outlives the replay and there are
no buffers: with ``--fused_backward_pass`` and Adafactor each parameter's step runs in its gradient
hook (``library.training.fused_backward``); without it, with the batched Adafactor, no accumulation
and nothing trained outside the graph, clipping and the whole optimizer step follow the backward
(:meth:`GraphedLoss.step_inside`, chosen by the trainer at the first batch).

Only what is safe is graphed (:func:`graph_blocker`): a CUDA device, no gradient synchronised inside
the backward (DDP; adapters on several processes are averaged after the replay), no fp16
GradScaler, no host-side randomness, no optimizer inside the backward unless it reads its
step-dependent numbers from the device; and only when the eager steps left room for a graph's memory
(:func:`headroom_needed`). Any failure to capture falls back to eager steps for the rest of the
run, with one log line, and gives the graphs' memory back.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from library.errors import first_error
from library.training.distributed import uses_wrappers

logger = logging.getLogger(__name__)

#: most distinct input shapes graphed in one run (each graph keeps its input/output tensors)
MAX_GRAPHS = 32

#: the least memory the eager steps must leave unused for a capture to be tried: the graphs' pool is
#: memory the eager code between replays (the optimizer step, a text encoder's backward) cannot reuse
BASE_HEADROOM_BYTES = 256 << 20
#: and this share of the gradient buffers' size on top: full fine-tuning keeps them through the forward.
#: Fitted on an H100 (2026-12-07): the graphed full fine-tune at 1024² (4.8 GiB of bf16 buffers) held
#: 0.44 GiB more than eager, and under a 12 GiB cap (0.82 GiB left) its first optimizer step after the
#: capture ran out of memory; this asks 0.97 GiB. The fused backward pass (no buffers) under 8 GiB and
#: LoRA r32 with checkpointing under 8 GiB (1.1 GiB left each) were graphed; graphed LoRA steps hold
#: what eager ones hold (configs A and B on an H200).
BUFFER_HEADROOM = 0.15


def headroom_needed(buffer_bytes: int) -> int:
    """Bytes the eager steps must have left unused before a capture (see :data:`BUFFER_HEADROOM`)."""
    return BASE_HEADROOM_BYTES + int(BUFFER_HEADROOM * buffer_bytes)


def memory_use(device: torch.device) -> tuple[int, int] | None:
    """``(peak bytes allocated so far, bytes this process may use)`` on a CUDA device, else None.

    The limit is the smaller of the per-process fraction (``set_per_process_memory_fraction``) of
    the card and what is free on it plus what this process already holds.
    """
    if device.type != "cuda" or not torch.cuda.is_initialized():
        return None
    total = torch.cuda.get_device_properties(device).total_memory
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    cap = int(total * fraction(device)) if fraction is not None else total
    free, _ = torch.cuda.mem_get_info(device)
    return torch.cuda.max_memory_allocated(device), min(cap, free + torch.cuda.memory_reserved(device))


def graph_blocker(cfg: Any, accelerator: Any, method: Any, fused: Any = None) -> str | None:
    """Why this run's steps cannot be graphed, or None when they can.

    ``fused``: the run's fused-backward object (``--fused_backward_pass``), whose own
    ``graph_blocker()`` says whether its optimizer steps can be replayed.
    """
    if getattr(cfg, "cuda_graphs", "auto") == "off":
        return "--cuda_graphs off"
    if accelerator.device.type != "cuda":
        return "not on a CUDA device"
    fused_why = None
    if cfg.fused_optimizer_groups:
        fused_why = "--fused_optimizer_groups steps the optimizer inside the backward"
    elif cfg.fused_backward_pass:
        fused_why = fused.graph_blocker() if fused is not None and hasattr(fused, "graph_blocker") \
            else "the optimizer steps inside the backward"
    reasons = [
        (synced_in_backward(accelerator, method, cfg.fused_backward_pass),
         "several processes with wrapped models (DDP synchronises gradients inside the backward)"),
        (cfg.mixed_precision == "fp16", "fp16 mixed precision (the loss scale changes between steps)"),
        (fused_why is not None, fused_why),
        (cfg.cpu_offload_checkpointing, "--cpu_offload_checkpointing copies to host memory"),
        (cfg.deepspeed, "DeepSpeed"),
    ]
    for blocked, why in reasons:
        if blocked:
            return why
    method_reason = getattr(method, "cuda_graph_blocker", None)
    return method_reason(cfg.gradient_checkpointing) if method_reason is not None else None


def synced_in_backward(accelerator: Any, method: Any, fused_backward_pass: bool) -> bool:
    """Whether several processes synchronise gradients inside the backward through a wrapper (DDP,
    FSDP, DeepSpeed), where a graph cannot replay it. Adapters on several processes are averaged by the
    training loop after the backward (``distributed.GradientAverager``), outside the graph, so their
    steps are graphed as on one GPU; the fused pass's own averaging is :meth:`FusedBackward.graph_blocker`'s."""
    return accelerator.num_processes > 1 and uses_wrappers(accelerator, method, fused_backward_pass)


#: adapter modules whose forward is known to do nothing on the host that changes from step to step
GRAPH_SAFE_NETWORKS = ("networks.lora", "networks.control_net_lllite")


def network_graph_blocker(network: torch.nn.Module, network_module: str, checkpointing: bool) -> str | None:
    """Why an adapter network's forward cannot be replayed as a graph, or None."""
    if network_module not in GRAPH_SAFE_NETWORKS:
        return f"--network_module {network_module} (only {', '.join(GRAPH_SAFE_NETWORKS)} are known to be graph-safe)"
    modules = list(network.modules())
    if any(getattr(m, "module_dropout", None) for m in modules):
        return "module_dropout (a host-side random choice per module and step)"
    if checkpointing and any(getattr(m, "dropout", None) or getattr(m, "rank_dropout", None) for m in modules):
        return "dropout with gradient checkpointing (the recomputed blocks would draw other random numbers)"
    return None


def without_rng_stash(unet: torch.nn.Module) -> None:
    """Re-enable the U-Net's gradient checkpointing without saving/restoring the RNG state per block.

    Reading the CUDA RNG state is not allowed while a graph is captured; it is only needed when a
    checkpointed block draws random numbers, which :func:`graph_blocker` rules out.
    """
    inner = getattr(unet, "_orig_mod", unet)
    if getattr(inner, "is_gradient_checkpointing", False):
        inner.enable_gradient_checkpointing(gradient_checkpointing_func=functools.partial(
            _checkpoint_call, torch.utils.checkpoint.checkpoint))


def _checkpoint_call(checkpoint: Callable, module: torch.nn.Module, *args: Any) -> Any:
    return checkpoint(module.__call__, *args, use_reentrant=False, preserve_rng_state=False)


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: dict[str, torch.Tensor]  # the graph's own input tensors (leaves; some require grad)
    loss: torch.Tensor
    input_grads: dict[str, torch.Tensor]  # input name -> the graph's gradient tensor for it
    param_ptrs: tuple[int, ...]


def _signature(inputs: dict[str, torch.Tensor]) -> tuple:
    return tuple((k, tuple(v.shape), v.dtype, v.requires_grad) for k, v in sorted(inputs.items()))


class GraphedLoss:
    """``loss_fn(inputs) -> loss`` and ``backward(loss)``, replayed as CUDA graphs (see the module doc).

    ``params``: every trained parameter. ``grad_buffers``: accumulate their gradients into fixed
    buffers (False when the backward consumes and frees every gradient itself: the fused backward pass).
    ``probe``: a tensor that every step must change (default: the gradient buffers' norms); it is
    compared once around each graph's first replay, and a graph that changed nothing turns graphs off
    (the batch is then redone eagerly), so a capture that silently missed work can never train wrong.
    ``optimizer_state``: when an optimizer steps inside the graphs, its state mapping; a capture that
    creates state (a tensor's first step) is refused, since that state would be graph memory whose
    values were never computed and that another graph's replay may overwrite.
    """

    def __init__(self, loss_fn: Callable[[dict[str, torch.Tensor]], torch.Tensor],
                 backward: Callable[[torch.Tensor], None], params: list[torch.Tensor], grad_buffers: bool = True,
                 probe: Callable[[], torch.Tensor] | None = None,
                 optimizer_state: Callable[[], dict] | None = None):
        self.loss_fn = loss_fn
        self.backward = backward
        self.params = params
        self.grad_buffers = grad_buffers
        self.probe = probe or self._buffer_norms
        self.optimizer_state = optimizer_state
        self.buffers: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # (param, buffer), from the first capture
        self._reached: list[torch.Tensor] | None = None  # params the first (eager) backward gave a gradient
        self.graphs: dict[tuple, _Graph] = {}
        self.seen: set[tuple] = set()
        self.pool = torch.cuda.graph_pool_handle()
        self.failed = False
        self.replays = 0

    def step_inside(self, backward: Callable[[torch.Tensor], None], probe: Callable[[], torch.Tensor],
                    optimizer_state: Callable[[], dict]) -> None:
        """From now on ``backward`` also steps the optimizer and clears every gradient, so the graphs
        replay whole optimizer steps: no gradient buffers (a gradient lives only inside a replay, as in an
        eager step), ``probe`` (the optimizer's state) tells that a new graph did its work, and
        ``optimizer_state`` is guarded as in the constructor. Before the first batch only."""
        if self.seen:
            raise RuntimeError("step_inside() after the first batch")
        self.backward, self.probe, self.grad_buffers = backward, probe, False
        self.optimizer_state = optimizer_state

    def loss_and_backward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The loss of ``inputs`` (a fresh 0-dim tensor) with its gradients accumulated, as an eager step would."""
        key = _signature(inputs)
        entry = self.graphs.get(key)
        if entry is None and not self.failed and key in self.seen and len(self.graphs) < MAX_GRAPHS:
            entry = self._capture(key, inputs)
            if entry is not None:
                loss = self._first_replay(entry, inputs)
                if loss is not None:
                    return loss
                entry = None  # the graph did nothing: graphs are off, this batch runs eagerly below
        if entry is None or entry.param_ptrs != self._param_ptrs():
            if entry is not None:  # an optimizer replaced a parameter's storage: the graph reads the old one
                logger.warning("a trained parameter moved in memory; CUDA graphs are off for the rest of the run")
                self.failed, self.graphs = True, {}
                self._release_unused()
            self.seen.add(key)
            self._use_buffers()
            loss = self.loss_fn(inputs)
            self.backward(loss)
            if self._reached is None:  # the run's first batch: every gradient was None before it
                self._reached = [p for p in self.params if p.grad is not None]
            return loss.detach()
        return self._replay(entry, inputs)

    def _buffer_norms(self) -> torch.Tensor:
        buffers = [buf for _, buf in self.buffers or ()]
        return torch.stack(torch._foreach_norm(buffers)) if buffers else torch.zeros(())

    def _first_replay(self, entry: _Graph, inputs: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """Replay a new graph and check (one host sync) that it did its work; None when it did not."""
        self._use_buffers()
        before = self.probe().detach().clone()
        loss = self._replay(entry, inputs)
        if not torch.equal(before, self.probe()):
            return loss
        logger.warning("a captured CUDA graph changed no gradient or optimizer state; CUDA graphs are off "
                       "for the rest of the run (this batch is redone eagerly)")
        self.failed, self.graphs = True, {}
        self._release_unused()
        return None

    def _param_ptrs(self) -> tuple[int, ...]:
        return tuple(p.data_ptr() for p in self.params)

    def _use_buffers(self) -> None:
        """Point every ``param.grad`` at its buffer: zeroed when the trainer cleared it (a fresh step),
        holding the gradient so far when an eager batch of this accumulation window left one elsewhere."""
        if self.buffers is None:
            return
        fresh = []
        for p, buf in self.buffers:
            if p.grad is None:
                fresh.append(buf)
            elif p.grad is not buf:
                buf.copy_(p.grad)
            p.grad = buf
        if fresh:
            torch._foreach_zero_(fresh)

    def _too_little_memory(self) -> str | None:
        """Why capturing would leave too little memory for the eager code between replays, or None."""
        use = memory_use(self.params[0].device) if self.params else None
        if use is None:
            return None
        buffered = (self._reached or ()) if self.grad_buffers else ()
        needed = headroom_needed(sum(p.numel() * p.element_size() for p in buffered))
        if use[1] - use[0] >= needed:
            return None
        return (f"the eager steps used {use[0] / 2**30:.2f} of the {use[1] / 2**30:.2f} GiB this process may "
                f"use; graphs need {needed / 2**30:.2f} GiB to spare")

    def _capture(self, key: tuple, inputs: dict[str, torch.Tensor]) -> _Graph | None:
        why = self._too_little_memory()
        if why is not None:
            logger.info("CUDA graphs off: %s; the run steps eagerly", why)
            self.failed = True
            self._release_unused()
            return None
        static = {k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in inputs.items()}
        graph = torch.cuda.CUDAGraph()
        try:
            torch.cuda.synchronize()
            # The eager steps' freed blocks stay cached in the default pool, which the graph's private
            # pool cannot use: hand them back first (with a trained U-Net they include the gradients
            # of a whole model, which would otherwise be held twice).
            torch.cuda.empty_cache()
            if self.grad_buffers and self.buffers is None:
                # only for parameters the backward reaches: one it does not must keep .grad None
                # (an optimizer steps a zero gradient but skips a missing one)
                self.buffers = [(p, torch.zeros_like(p)) for p in self._reached or ()]
            held = [p.grad for p in self.params]
            stated = set(map(id, self.optimizer_state())) if self.optimizer_state is not None else None
            self._use_buffers()  # the graph adds into the buffers (autograd accumulates in place)
            try:
                with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                    loss = self.loss_fn(static)
                    self.backward(loss)
                strays = self._stray_gradients(held)
            finally:
                # Capturing ran no kernels: the gradients are as before it (also when it raised part-way,
                # leaving never-computed graph memory as some .grad), and the replay adds this batch's.
                for p, g in zip(self.params, held):
                    p.grad = g
                fresh = self._drop_new_states(stated)
            if strays:
                raise RuntimeError(f"the graph reaches {strays} trained tensor(s) the first batch gave no gradient")
            if fresh:
                raise RuntimeError(f"the graph takes the first optimizer step of {fresh} trained tensor(s)")
        except Exception as exc:
            logger.warning("CUDA graph capture failed (%s); the rest of the run steps eagerly", first_error(exc))
            logger.debug("CUDA graph capture failure", exc_info=exc)
            self.failed = True
            self._release_unused()
            return None
        input_grads = {k: v.grad for k, v in static.items() if v.grad is not None}
        entry = _Graph(graph, static, loss.detach(), input_grads, self._param_ptrs())
        self.graphs[key] = entry
        logger.info("captured a CUDA graph for %s", ", ".join(f"{k} {list(v.shape)}" for k, v in sorted(inputs.items())
                                                              if v.ndim > 1))
        return entry

    def _release_unused(self) -> None:
        """With no graph left to replay: give back the gradient buffers and the graphs' memory pool.

        Eager steps then hold gradients only from backward to the optimizer step, as without graphs
        (a buffer that is some ``.grad`` now is freed when the trainer clears it), so a capture that ran
        out of memory on a card near its limit leaves the eager steps as much memory as a run that
        never tried."""
        if self.graphs:
            return
        self.buffers = None
        self.pool = None
        torch.cuda.empty_cache()

    def _drop_new_states(self, before: set[int] | None) -> int:
        """Remove the optimizer state a capture created (never-computed graph memory); how many."""
        if before is None:
            return 0
        state = self.optimizer_state()
        fresh = [p for p in state if id(p) not in before]
        for p in fresh:
            del state[p]
        return len(fresh)

    def _stray_gradients(self, held: list) -> int:
        """How many parameters without a buffer the capture gave a gradient (the replays would drop it)."""
        if not self.grad_buffers:  # the fused backward consumes every gradient inside the graph
            return 0
        buffered = {id(p) for p, _ in self.buffers or ()}
        return sum(1 for p, g in zip(self.params, held) if id(p) not in buffered and p.grad is not g)

    def _replay(self, entry: _Graph, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        self._use_buffers()
        for name, tensor in inputs.items():
            entry.inputs[name].detach().copy_(tensor.detach(), non_blocking=True)
        entry.graph.replay()
        self.replays += 1
        follow = [(inputs[k], g) for k, g in entry.input_grads.items() if inputs[k].requires_grad]
        if follow:
            torch.autograd.backward([t for t, _ in follow], [g for _, g in follow])
        return entry.loss.clone()
