"""EMA of trained weights (--ema)."""

from __future__ import annotations

import torch

from library.training.ema import EMA


def test_ema_follows_the_formula_and_interval():
    p = torch.nn.Parameter(torch.zeros(3))
    ema = EMA([("w", p)], decay=0.9, update_every=2)
    with torch.no_grad():
        p.fill_(1.0)
    ema.step(1)  # not on the interval: unchanged
    assert torch.equal(ema.shadow["w"], torch.zeros(3))
    ema.step(2)
    torch.testing.assert_close(ema.shadow["w"], torch.full((3,), 0.1))
    ema.step(4)
    torch.testing.assert_close(ema.shadow["w"], torch.full((3,), 0.19))


def test_copy_to_and_state_round_trip():
    p = torch.nn.Parameter(torch.ones(2, dtype=torch.bfloat16))
    ema = EMA([("w", p)], decay=0.5, on_cpu=True)
    with torch.no_grad():
        p.fill_(3.0)
    ema.step(1)
    saved = ema.copy_to({"w": p})
    assert torch.equal(p.detach(), torch.full((2,), 2.0, dtype=torch.bfloat16))
    assert torch.equal(saved["w"], torch.full((2,), 3.0, dtype=torch.bfloat16))
    other = EMA([("w", torch.nn.Parameter(torch.zeros(2)))], decay=0.5)
    other.load_state_dict(ema.state_dict())
    assert torch.equal(other.shadow["w"], ema.shadow["w"]) and other.updates == 1
