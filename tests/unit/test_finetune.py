"""Full fine-tune method: the ``--block_lr`` block numbering and that each block's rate trains exactly that block."""

from __future__ import annotations

import copy

import pytest
import torch

from library.models.presets import build_random
from library.training.finetune import (
    NUM_BLOCKS, FineTuneMethod, FineTuneOptions, unet_block_index, unet_param_blocks)


@pytest.mark.parametrize("name, index", [
    ("time_embed.0.weight", 0),
    ("time_embed.2.bias", 0),
    ("label_emb.0.0.weight", 0),
    ("label_emb.0.2.bias", 0),
    ("input_blocks.0.0.weight", 1),
    ("input_blocks.3.0.op.weight", 4),
    ("input_blocks.8.1.proj_in.weight", 9),
    ("middle_block.0.in_layers.0.weight", 10),
    ("middle_block.1.transformer_blocks.0.attn1.to_q.weight", 11),
    ("middle_block.2.out_layers.3.bias", 12),
    ("output_blocks.0.0.skip_connection.weight", 13),
    ("output_blocks.2.2.conv.weight", 15),
    ("output_blocks.8.0.out_layers.3.weight", 21),
    ("out.0.weight", 22),
    ("out.2.weight", 22),
])
def test_block_index_of_sai_names(name, index):
    assert unet_block_index(name) == index


def test_block_index_rejects_unknown_names():
    with pytest.raises(ValueError):
        unet_block_index("conditioner.embedders.0.foo")


def test_full_size_unet_blocks_cover_every_parameter_and_index():
    unet = build_random("base", meta=True).unet
    blocks = unet_param_blocks(unet)
    names = [n for n, _ in unet.named_parameters()]
    assert set(blocks) == set(names)
    assert set(blocks.values()) == set(range(NUM_BLOCKS))
    # diffusers names land in the SAI block they come from
    expected = {
        "time_embedding.linear_1.weight": 0,
        "add_embedding.linear_2.bias": 0,
        "conv_in.weight": 1,
        "down_blocks.0.resnets.0.conv1.weight": 2,
        "down_blocks.0.downsamplers.0.conv.weight": 4,
        "down_blocks.2.attentions.1.proj_in.weight": 9,
        "mid_block.resnets.0.conv1.weight": 10,
        "mid_block.attentions.0.transformer_blocks.9.attn2.to_k.weight": 11,
        "mid_block.resnets.1.conv2.bias": 12,
        "up_blocks.0.resnets.0.conv_shortcut.weight": 13,
        "up_blocks.0.upsamplers.0.conv.weight": 15,
        "up_blocks.2.resnets.2.conv2.weight": 21,
        "conv_norm_out.weight": 22,
        "conv_out.bias": 22,
    }
    for name, index in expected.items():
        assert blocks[name] == index, name
    # SDXL base: 4 parameters each in time_embed / label_emb-> block 0 has 8
    assert sum(1 for b in blocks.values() if b == 0) == 8


@pytest.fixture(scope="module")
def tiny_unet():
    """The tiny U-Net and its initial weights, built once; one intra-op thread (2 shared cores thrash otherwise)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        unet = build_random("tiny").unet
        yield unet, copy.deepcopy(unet.state_dict())
    finally:
        torch.set_num_threads(threads)


def _unet_inputs():
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 8, 8, generator=gen)
    context = torch.randn(1, 77, 192, generator=gen)
    added = {"text_embeds": torch.randn(1, 128, generator=gen),
             "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])}
    target = torch.randn(1, 4, 8, 8, generator=gen)
    return sample, torch.tensor([500]), context, added, target


@pytest.mark.parametrize("index", range(NUM_BLOCKS))
def test_block_lr_trains_exactly_its_block(tiny_unet, index):
    unet, initial = tiny_unet
    unet.load_state_dict(initial)
    unet.requires_grad_(False)
    unet.zero_grad(set_to_none=True)
    block_lr = [0.0] * NUM_BLOCKS
    block_lr[index] = 1e-2
    method = FineTuneMethod(FineTuneOptions(block_lr=block_lr), learning_rate=1e-4)
    assert method.trains_unet

    groups = method._unet_groups(unet)
    blocks = unet_param_blocks(unet)
    in_block = {n for n, b in blocks.items() if b == index}
    assert in_block, f"block {index} has no parameters in the tiny U-Net"
    names = {id(p): n for n, p in unet.named_parameters()}
    assert len(groups) == 1 and groups[0]["lr"] == 1e-2
    assert {names[id(p)] for p in groups[0]["params"]} == in_block
    assert {n for n, p in unet.named_parameters() if p.requires_grad} == in_block

    sample, t, context, added, target = _unet_inputs()
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)  # first Adam step moves every param with a gradient
    loss = torch.nn.functional.mse_loss(unet(sample, t, context, added_cond_kwargs=added).sample, target)
    loss.backward()
    optimizer.step()

    after = unet.state_dict()
    changed = {n for n in blocks if not torch.equal(initial[n], after[n])}
    assert changed == in_block, (sorted(changed - in_block)[:5], sorted(in_block - changed)[:5])


def test_block_lr_with_wrong_count_is_a_user_error(tiny_unet):
    from library.errors import UserError

    unet, _ = tiny_unet
    method = FineTuneMethod(FineTuneOptions(block_lr=[1e-4] * 22), learning_rate=1e-4)
    with pytest.raises(UserError, match="23"):
        method._unet_groups(unet)


def test_all_zero_block_lr_trains_nothing():
    method = FineTuneMethod(FineTuneOptions(block_lr=[0.0] * NUM_BLOCKS), learning_rate=0.0)
    assert not method.trains_unet
