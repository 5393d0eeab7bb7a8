"""Exponential moving average of trained weights (``--ema``)."""

from __future__ import annotations

import torch

#: fp32 bytes of weights copied to the host before the CPU folds them in (--ema_on_cpu)
HOST_CHUNK_BYTES = 256 << 20


class EMA:
    """``shadow = decay * shadow + (1 - decay) * param`` every ``update_every`` optimizer steps.

    The shadow copy lives in fp32, on the parameters' device or on the CPU (``on_cpu``).
    ``state_dict``/``load_state_dict`` let accelerate save it with ``--save_state``.
    """

    def __init__(self, named_params: list[tuple[str, torch.nn.Parameter]], decay: float = 0.9999,
                 update_every: int = 1, on_cpu: bool = False):
        self.decay = decay
        self.update_every = max(1, update_every)
        self.params = dict(named_params)
        device = "cpu" if on_cpu else None
        self.shadow = {n: p.detach().to(device=device or p.device, dtype=torch.float32, copy=True)
                       for n, p in self.params.items()}
        self.updates = 0

    @torch.no_grad()
    def step(self, global_step: int) -> None:
        """Fold the current weights into the average when ``global_step`` is on the update interval."""
        if global_step % self.update_every:
            return
        self.updates += 1
        weight = 1.0 - self.decay
        pending: list[tuple[torch.Tensor, torch.Tensor, torch.device]] = []  # (shadow, host copy, source)
        size = 0
        for name, p in self.params.items():
            s = self.shadow[name]
            if s.device == p.device:
                s.lerp_(p.detach().to(torch.float32), weight)
                continue
            # a non-blocking copy to the host returns before the data is there: the copies of a chunk are
            # queued together, then waited for once, before the CPU reads them
            pending.append((s, p.detach().to(s.device, torch.float32, non_blocking=True), p.device))
            size += s.numel() * 4
            if size >= HOST_CHUNK_BYTES:
                _fold_when_copied(pending, weight)
                size = 0
        _fold_when_copied(pending, weight)

    @torch.no_grad()
    def copy_to(self, named_params: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
        """Put the averages into the parameters; returns the replaced values so they can be restored."""
        saved = {}
        for name, p in named_params.items():
            if name in self.shadow:
                saved[name] = p.detach().clone()
                p.copy_(self.shadow[name].to(p.device, p.dtype))
        return saved

    def state_dict(self) -> dict:
        return {"shadow": self.shadow, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        for name, value in state["shadow"].items():
            self.shadow[name].copy_(value)
        self.updates = state["updates"]


def _fold_when_copied(pending: list[tuple[torch.Tensor, torch.Tensor, torch.device]], weight: float) -> None:
    """Wait for the queued copies, then fold each into its shadow; empties ``pending``."""
    for device in {source for _, _, source in pending if source.type == "cuda"}:
        torch.cuda.current_stream(device).synchronize()
    for shadow, host, _ in pending:
        shadow.lerp_(host, weight)
    pending.clear()
