"""What the network trainer needs from an adapter network (LoRA, ControlNet-LLLite, ...).

A ``--network_module`` names a module with a ``create_network(...)`` (and, for ``--dim_from_weights``
and inference, ``create_network_from_weights(...)``) that returns an object satisfying
:class:`NetworkProtocol`. The trainer calls only these methods, so any adapter implementing them
trains, saves and resumes through the same loop.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Protocol, Sequence, runtime_checkable

import torch


@runtime_checkable
class NetworkProtocol(Protocol):
    """The methods the training loop calls on an adapter network (also an ``nn.Module``)."""

    def apply_to(self, text_encoders: Sequence[torch.nn.Module] | torch.nn.Module | None, unet: torch.nn.Module,
                 apply_text_encoder: bool = True, apply_unet: bool = True) -> None:
        """Hook the adapter into the base models; parts not applied must not exist afterwards."""

    def set_multiplier(self, multiplier: float) -> None:
        """Set the strength of the adapter's contribution (0 gives the base model)."""

    def prepare_optimizer_params(self, text_encoder_lr: float | Sequence[float] | None, unet_lr: float | None,
                                 default_lr: float) -> tuple[list[dict[str, Any]], list[str]]:
        """Optimizer parameter groups and one description per group (used in ``lr/<description>`` logs)."""

    def prepare_grad_etc(self, text_encoder: Any, unet: torch.nn.Module) -> None:
        """Make the adapter's own parameters trainable before the optimizer is built."""

    def on_epoch_start(self, text_encoder: Any, unet: torch.nn.Module) -> None:
        """Called at the start of every epoch (put the adapter in training mode)."""

    def get_trainable_params(self) -> Iterable[torch.nn.Parameter]:
        """All parameters that are trained (for gradient clipping and norms)."""

    def enable_gradient_checkpointing(self) -> None:
        """Enable checkpointing inside the adapter, if it has any of its own (may be a no-op)."""

    def state_dict(self, *args: Any, **kwargs: Any) -> Mapping[str, torch.Tensor]:
        """The tensors that make up the saved file, keyed exactly as written."""

    def save_weights(self, file: str, dtype: torch.dtype | None, metadata: Mapping[str, str] | None) -> None:
        """Write the adapter to ``file`` (safetensors with metadata, or a torch pickle) atomically."""

    def load_weights(self, file: str) -> Any:
        """Load weights written by :meth:`save_weights`; unknown keys are an error."""

    def is_mergeable(self) -> bool:
        """Whether the adapter can be baked into the base weights (``merge_to``)."""


class AdapterNetwork(torch.nn.Module):
    """What every adapter network of this package does the same way: all of its own parameters are
    trained, it runs inside the base model's (checkpointed) blocks, training mode for every epoch.

    Subclasses add what differs: hooking (``apply_to``), the multiplier, parameter groups and files.
    """

    def enable_gradient_checkpointing(self) -> None:
        """Nothing to do: the adapter's modules run inside the base model's (checkpointed) blocks."""

    def prepare_grad_etc(self, text_encoder: Any = None, unet: torch.nn.Module | None = None) -> None:
        """Make every parameter of the adapter trainable."""
        self.requires_grad_(True)

    def on_epoch_start(self, text_encoder: Any = None, unet: torch.nn.Module | None = None) -> None:
        """Training mode (dropouts active)."""
        self.train()

    def get_trainable_params(self) -> Iterable[torch.nn.Parameter]:
        """All parameters of the adapter."""
        return self.parameters()


class HookedModule(torch.nn.Module):
    """An adapter module that takes over the forward of one base module (``org_module``).

    Subclasses set ``self.org_forward = None`` in ``__init__``, expose ``org_module`` and call
    ``self.org_forward(x)`` for the base computation. Hooks stack: a module hooked on top of another
    adapter's hook gives that hook back on :meth:`restore`.
    """

    org_forward = None
    _had_own_forward = False

    def apply_to(self) -> None:
        """Replace the original module's forward with this module's (idempotent)."""
        if self.org_forward is not None:
            return
        org = self.org_module
        self._had_own_forward = "forward" in org.__dict__  # e.g. another adapter hooked in first
        self.org_forward = org.forward
        org.forward = self.forward

    def restore(self) -> None:
        """Give the original module its previous forward back."""
        if self.org_forward is None:
            return
        org = self.org_module
        if self._had_own_forward:
            org.forward = self.org_forward
        else:
            org.__dict__.pop("forward", None)
        self.org_forward = None

