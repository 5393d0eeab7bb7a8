"""SDXL conditioning: the text context, the pooled embedding and the six size/crop numbers.

- context = TE1 penultimate hidden states ++ TE2 penultimate hidden states (B, T, 768 + 1280)
- pooled  = TE2 final-norm state at the first end-of-text token, through the text projection (B, 1280)
- time_ids = (original h, w, crop top, left, target h, w) per sample (B, 6); the U-Net embeds each
  number with a 256-wide cos-first sinusoid.

Long prompts (``--max_token_length`` 150 or 225) are cut into 75-token windows, each wrapped as
BOS + 75 tokens + EOS/PAD and encoded separately; the windows' states are joined back into
BOS + n*75 + EOS (T = 2 + 75n) and the pooled embedding comes from the first window.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from library.models.sdxl import EOS_TOKEN_ID

WINDOW = 75
ALLOWED_MAX_TOKEN_LENGTHS = (None, 75, 150, 225)


def sequence_length(max_token_length: int | None) -> int:
    """Number of context tokens the U-Net sees: 77, 152 or 227."""
    if max_token_length not in ALLOWED_MAX_TOKEN_LENGTHS:
        raise ValueError(f"max_token_length must be one of 75, 150, 225 (got {max_token_length})")
    return (max_token_length or WINDOW) + 2


def tokenize(tokenizer, prompts: Sequence[str], max_token_length: int | None) -> torch.Tensor:
    """Token ids cut into windows: (B, n, 77) with n = 1, 2 or 3."""
    length = sequence_length(max_token_length)
    ids = tokenizer(list(prompts), padding="max_length", truncation=True, max_length=length,
                    return_tensors="pt").input_ids  # (B, length)
    return split_windows(ids, tokenizer.pad_token_id)


def split_windows(ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """(B, 2 + 75n) ids -> (B, n, 77) windows, each BOS + 75 tokens + closing token."""
    if ids.shape[1] == WINDOW + 2:
        return ids[:, None, :]
    windows = []
    for start in range(1, ids.shape[1] - 1, WINDOW):
        chunk = torch.cat([ids[:, :1], ids[:, start:start + WINDOW], ids[:, -1:]], dim=1)  # (B, 77)
        if pad_id != EOS_TOKEN_ID:
            # OpenCLIP-style padding (TE2 pads with 0): a window cut inside the text ends with EOS,
            # and a window holding only padding still gets an EOS right after BOS.
            text_before_last = (chunk[:, -2] != EOS_TOKEN_ID) & (chunk[:, -2] != pad_id)
            chunk[:, -1] = torch.where(text_before_last, torch.full_like(chunk[:, -1], EOS_TOKEN_ID), chunk[:, -1])
            starts_with_pad = chunk[:, 1] == pad_id
            chunk[:, 1] = torch.where(starts_with_pad, torch.full_like(chunk[:, 1], EOS_TOKEN_ID), chunk[:, 1])
        windows.append(chunk)
    return torch.stack(windows, dim=1)


def merge_windows(states: torch.Tensor, n: int) -> torch.Tensor:
    """(B*n, 77, C) per-window states -> (B, 2 + 75n, C): BOS, each window's 75 tokens, last EOS."""
    if n == 1:
        return states
    b = states.shape[0] // n
    states = states.reshape(b, n, states.shape[1], states.shape[2])
    body = states[:, :, 1:-1].reshape(b, n * WINDOW, states.shape[-1])
    return torch.cat([states[:, 0, :1], body, states[:, -1, -1:]], dim=1)


def first_eos_index(ids: torch.Tensor) -> torch.Tensor:
    """Position of the first end-of-text token in each row (robust to added TI tokens)."""
    is_eos = (ids == EOS_TOKEN_ID).int()
    return torch.argmax(is_eos, dim=-1)


def _inner(module):
    """The model inside a DDP-style wrapper (called through the wrapper; attributes read inside)."""
    return getattr(module, "module", module)


def encode_te1(te1, ids: torch.Tensor) -> torch.Tensor:
    """TE1 penultimate hidden states for windowed ids (B, n, 77) -> (B, T, C1)."""
    b, n, t = ids.shape
    out = te1(ids.reshape(b * n, t).to(_inner(te1).device), output_hidden_states=True)
    return merge_windows(out.hidden_states[-2], n)


def encode_te2(te2, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """TE2 penultimate hidden states (B, T, C2) and the pooled projection (B, P) from the first window."""
    b, n, t = ids.shape
    flat = ids.reshape(b * n, t).to(_inner(te2).device)
    out = te2(flat, output_hidden_states=True)
    hidden = merge_windows(out.hidden_states[-2], n)
    final = out.last_hidden_state.reshape(b, n, t, -1)[:, 0]  # first window, after the final LayerNorm
    eos = first_eos_index(flat.reshape(b, n, t)[:, 0])
    pooled = final[torch.arange(b, device=final.device), eos]
    return hidden, _inner(te2).text_projection(pooled)


@dataclass
class TextConditioner:
    """Tokenizers + text encoders + the prompt length: turns captions into (context, pooled)."""

    tokenizer1: object
    tokenizer2: object
    text_encoder1: torch.nn.Module
    text_encoder2: torch.nn.Module
    max_token_length: int | None = None

    def tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return (tokenize(self.tokenizer1, prompts, self.max_token_length),
                tokenize(self.tokenizer2, prompts, self.max_token_length))

    def encode_ids(self, ids1: torch.Tensor, ids2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(hidden1, hidden2, pooled2) for windowed token ids."""
        h1 = encode_te1(self.text_encoder1, ids1)
        h2, pooled = encode_te2(self.text_encoder2, ids2)
        return h1, h2, pooled

    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(context (B, T, C1 + C2), pooled (B, P)) for a list of prompts."""
        return self.context_of(*self.tokenize(prompts))

    def context_of(self, ids1: torch.Tensor, ids2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(context, pooled) for windowed token ids: device work only, no host syncs (CUDA-graphable)."""
        h1, h2, pooled = self.encode_ids(ids1, ids2)
        return torch.cat([h1, h2.to(h1.dtype)], dim=-1), pooled


def time_ids(original_hw: torch.Tensor, crop_top_left: torch.Tensor, target_hw: torch.Tensor) -> torch.Tensor:
    """The six SDXL size numbers per sample, heights first: (B, 6) float."""
    return torch.cat([original_hw, crop_top_left, target_hw], dim=-1).float()


def unet_added_cond(pooled: torch.Tensor, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """``added_cond_kwargs`` for diffusers' SDXL U-Net."""
    return {"text_embeds": pooled, "time_ids": ids.to(device=pooled.device, dtype=pooled.dtype)}
