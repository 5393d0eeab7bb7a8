"""Prompt encoding with A1111-style attention weights: ``(word:1.3)``, ``(word)``, ``[word]``, ``BREAK``.

The prompt is split into weighted runs (:func:`library.text.attention.parse_prompt_attention`)
and tokenised run by run, so every token carries the weight of the run it came from. The token
ids are laid out exactly as :class:`library.diffusion.conditioning.TextConditioner` lays them out
(BOS + tokens + EOS + padding, cut into 75-token windows), both text encoders run as usual, and
then each encoder's hidden states are multiplied token by token by the weights and rescaled so
that, per sample, their mean equals the mean before weighting (what A1111 and sd-scripts do, so
emphasis changes the direction of the context rather than its overall magnitude). The pooled
embedding is not weighted.

With every weight 1.0 the result equals the unweighted encoding exactly; training scripts use
:func:`encode_weighted_prompt` for ``--weighted_captions``, the generator for every prompt.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from library.diffusion.conditioning import WINDOW, encode_te1, encode_te2, split_windows
from library.text.attention import tokenize_weighted
from library.models.sdxl import BOS_TOKEN_ID, EOS_TOKEN_ID


def windows_for(max_token_length: int | None) -> int:
    """Number of 75-token windows for ``max_token_length`` (None -> 1; must be a multiple of 75)."""
    if max_token_length is None:
        return 1
    if max_token_length < WINDOW or max_token_length % WINDOW:
        raise ValueError(f"max_token_length must be a positive multiple of 75 (got {max_token_length})")
    return max_token_length // WINDOW


def weighted_token_rows(tokenizer, prompts: Sequence[str], windows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and weights laid out as BOS + tokens + EOS + padding: two (B, 2 + 75*windows) tensors.

    Tokens beyond ``75 * windows`` are dropped (with a warning from ``tokenize_weighted``), as the
    plain tokenizer's truncation does. BOS, EOS and padding have weight 1.0.
    """
    length = WINDOW * windows + 2
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else EOS_TOKEN_ID
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else BOS_TOKEN_ID
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else EOS_TOKEN_ID
    id_rows, weight_rows = [], []
    for prompt in prompts:
        ids, weights = tokenize_weighted(tokenizer, prompt, windows)
        fill = length - 2 - len(ids)
        id_rows.append([bos] + ids + [eos] + [pad_id] * fill)
        weight_rows.append([1.0] + weights + [1.0] * (fill + 1))
    return torch.tensor(id_rows, dtype=torch.long), torch.tensor(weight_rows, dtype=torch.float32)


def count_windows(tokenizer, prompts: Sequence[str], max_windows: int) -> int:
    """The fewest 75-token windows (1..max_windows) that hold the longest of ``prompts``."""
    longest = 0
    for prompt in prompts:
        ids, _ = tokenize_weighted(tokenizer, prompt, 10**6)  # no limit here: the encoding warns about truncation
        longest = max(longest, len(ids))
    return max(1, min(max_windows, math.ceil(longest / WINDOW)))


def apply_token_weights(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Multiply (B, T, C) hidden states by (B, T) weights and restore each sample's mean.

    Rows whose weights are all 1.0 come back unchanged (bit for bit); a sample whose weighted mean
    is ~0 is left un-rescaled rather than divided by zero.
    """
    weights = weights.to(device=hidden.device)
    if bool((weights == 1.0).all()):
        return hidden
    before = hidden.float().mean(dim=(-2, -1))  # (B,)
    weighted = hidden * weights.to(hidden.dtype).unsqueeze(-1)
    after = weighted.float().mean(dim=(-2, -1))  # (B,)
    safe = after.abs() > 1e-12
    ratio = torch.where(safe, before / torch.where(safe, after, torch.ones_like(after)), torch.ones_like(after))
    return weighted * ratio.to(hidden.dtype)[:, None, None]


def encode_weighted_prompt(tokenizers: Sequence, text_encoders: Sequence[torch.nn.Module], prompts: Sequence[str],
                           max_token_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode A1111-weighted prompts for SDXL: ``(context (B, T, C1 + C2), pooled (B, P))``.

    ``tokenizers`` and ``text_encoders`` are the (TE1, TE2) pairs; ``max_token_length`` is None
    (77 tokens), 150 or 225 as for training (any multiple of 75 is accepted: T = 2 + max_token_length).
    Gradients flow through (no ``no_grad`` here), so trainers can use it while training the text
    encoders. Prompts without weights give exactly :meth:`TextConditioner.encode`'s result.
    """
    windows = windows_for(max_token_length)
    tok1, tok2 = tokenizers
    te1, te2 = text_encoders
    ids1, w1 = weighted_token_rows(tok1, prompts, windows)
    ids2, w2 = weighted_token_rows(tok2, prompts, windows)
    h1 = encode_te1(te1, split_windows(ids1, tok1.pad_token_id))
    h2, pooled = encode_te2(te2, split_windows(ids2, tok2.pad_token_id))
    h1 = apply_token_weights(h1, w1)
    h2 = apply_token_weights(h2, w2)
    return torch.cat([h1, h2.to(h1.dtype)], dim=-1), pooled
