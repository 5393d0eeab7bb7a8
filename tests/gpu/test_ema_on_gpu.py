"""On a CUDA GPU: ``--ema_on_cpu`` folds in the weights as they are once the copies to the host have landed."""

from __future__ import annotations

import pytest
import torch

from library.training import ema as ema_module

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_ema_on_cpu_reads_the_copied_weights(monkeypatch):
    monkeypatch.setattr(ema_module, "HOST_CHUNK_BYTES", 1 << 20)  # several chunks
    torch.manual_seed(0)
    params = [(f"p{i}", torch.nn.Parameter(torch.randn(512, 512, device="cuda", dtype=torch.bfloat16)))
              for i in range(8)]
    ema = ema_module.EMA(params, decay=0.5, on_cpu=True)
    expected = {name: p.detach().float().cpu() for name, p in params}
    busy = torch.randn(8192, 8192, device="cuda")
    for step in range(3):
        for _ in range(4):  # keep the GPU busy, so that the weights change late and a racing read sees old ones
            busy = (busy @ busy).tanh_()
        with torch.no_grad():
            for _, p in params:
                p.add_(1.0)
        ema.step(step)
        for name, p in params:
            expected[name].lerp_(p.detach().float().cpu(), 0.5)
    for name, _ in params:
        assert ema.shadow[name].device.type == "cpu"
        torch.testing.assert_close(ema.shadow[name], expected[name], rtol=0, atol=0)
