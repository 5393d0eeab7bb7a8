"""--torch_compile: the U-Net's repeated blocks compiled in place with the LoRA hooks inside, and the
--dynamo_fullgraph / --dynamo_dynamic options doing what sd-scripts' do (fullgraph=, dynamic=).

Dynamo's guards and graph capture are the same for every backend, so the CPU tests use the "eager"
backend (no kernel code generation) and count the graphs dynamo captured.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from library.config import args as A
from library.config import schema as S
from library.models.regional_compile import CompileSettings, compile_unet_regions, is_compiled_region
from library.training.config import TrainConfig
from networks import lora


@pytest.fixture
def hooked_unet():
    """The tiny U-Net with a LoRA (non-zero up weights, so the branch changes the output) hooked in."""
    from library.models.presets import build_random

    models = build_random("tiny", seed=0)
    net = lora.create_network(1.0, 4, 2.0, None, [models.text_encoder1, models.text_encoder2], models.unet)
    net.apply_to(None, models.unet, apply_text_encoder=False, apply_unet=True)
    torch.manual_seed(1)
    for module in net.unet_loras:
        torch.nn.init.normal_(module.lora_up.weight, std=0.05)
    torch._dynamo.reset()
    counters.clear()
    yield models.unet, net
    torch._dynamo.reset()


def _inputs(size: int = 8, batch: int = 1):
    g = torch.Generator().manual_seed(size * 10 + batch)
    return (torch.randn(batch, 4, size, size, generator=g), torch.tensor([10] * batch),
            torch.randn(batch, 77, 192, generator=g),
            {"text_embeds": torch.randn(batch, 128, generator=g), "time_ids": torch.randn(batch, 6, generator=g)})


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


def _step(unet, net, inputs) -> torch.Tensor:
    x, t, ctx, added = inputs
    out = unet(x, t, ctx, added_cond_kwargs=added).sample
    out.square().mean().backward()
    return out.detach()


@pytest.mark.slow  # dynamo traces the tiny U-Net's blocks: ~10 s on 2 cores
def test_one_compile_per_block_shape_same_results_as_eager(hooked_unet):
    unet, net = hooked_unet
    inputs = _inputs()
    eager_out = _step(unet, net, inputs)
    eager_grads = [p.grad.clone() for p in net.parameters()]
    net.zero_grad(set_to_none=True)

    blocks = [m for m in unet.modules() if type(m).__name__ == "BasicTransformerBlock"]
    assert compile_unet_regions(unet, CompileSettings(backend="eager")) == len(blocks) > 2
    assert all(is_compiled_region(b) for b in blocks)
    assert "lora_up" not in "".join(unet.state_dict())  # the LoRA stays outside the U-Net's own keys
    assert not any("_orig_mod" in k for k in unet.state_dict())  # compiled in place: keys unchanged

    out = _step(unet, net, inputs)
    widths = {b.norm1.normalized_shape for b in blocks}
    assert _graphs() == len(widths) == 2  # the 17 blocks share 2 graphs: no per-block compile
    torch.testing.assert_close(out, eager_out, rtol=1e-5, atol=1e-6)
    for p, g in zip(net.parameters(), eager_grads):  # gradients reach the LoRA through the compiled blocks
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-7)
    for _ in range(2):
        _step(unet, net, inputs)
    assert _graphs() == 2  # later steps reuse the graphs: no recompilation per step
    _step(unet, net, _inputs(size=16))  # a new bucket: one compile per block shape (static shapes)
    assert _graphs() == 4


@pytest.mark.slow  # dynamo traces the tiny U-Net's blocks: ~10 s on 2 cores
def test_dynamo_dynamic_serves_every_bucket_with_one_compile(hooked_unet):
    unet, net = hooked_unet
    compile_unet_regions(unet, CompileSettings(backend="eager", dynamic=True))
    with torch.no_grad():
        for size, batch in ((8, 2), (16, 3)):  # (sizes 0 and 1 are always specialised by dynamo)
            x, t, ctx, added = _inputs(size, batch)
            unet(x, t, ctx, added_cond_kwargs=added)
    assert _graphs() == 2  # one symbolic graph per block width, whatever the resolution and batch


def test_dynamo_fullgraph_turns_a_graph_break_into_an_error(hooked_unet):
    """Without fullgraph, dynamo splits such a block at the break and runs the pieces (slow to trace here)."""
    unet, net = hooked_unet
    for module in net.unet_loras:  # module dropout draws a Python float from a tensor: a graph break
        module.module_dropout = 0.1
    net.train()
    x, t, ctx, added = _inputs()
    compile_unet_regions(unet, CompileSettings(backend="eager", fullgraph=True))
    with pytest.raises(Exception, match="(?i)graph break|unsupported|data-dependent|Tensor.item"):
        unet(x, t, ctx, added_cond_kwargs=added)


def test_options_reach_the_compile_settings_and_are_no_longer_reported_as_ignored(caplog):
    ns = A.parse_args_with_config(A.build_trainer_parser("train_network"),
                                  ["--torch_compile", "--dynamo_fullgraph", "--dynamo_dynamic",
                                   "--dynamo_mode", "max-autotune"])
    cfg = TrainConfig.from_namespace(ns)
    assert (cfg.torch_compile, cfg.dynamo_fullgraph, cfg.dynamo_dynamic) == (True, True, True)
    kwargs = CompileSettings(cfg.dynamo_backend, cfg.dynamo_mode, cfg.dynamo_fullgraph, cfg.dynamo_dynamic).compile_kwargs()
    assert kwargs == {"backend": "inductor", "mode": "max-autotune", "fullgraph": True, "dynamic": True}
    assert CompileSettings(mode="default").compile_kwargs()["mode"] is None
    assert "dynamo_fullgraph" not in S.NOT_IMPLEMENTED and "dynamo_dynamic" not in S.NOT_IMPLEMENTED
    with caplog.at_level(logging.WARNING):
        S._warn_ineffective(ns, "train_network")
    assert "dynamo" not in caplog.text
