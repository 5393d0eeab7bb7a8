"""Unit tests of validation timing/seeding, the start position, save_n_epoch_ratio, fused optimizer
groups and CPU-offloaded checkpointing (the options that sd-scripts has and we used to ignore)."""

from __future__ import annotations

import argparse
import logging

import pytest
import torch
from torch.optim.lr_scheduler import LambdaLR

from library.config import args as A
from library.config import schema as S
from library.errors import UserError
from library.training.checkpointing import TrainProgress, save_every_n_epochs_for_ratio
from library.training.fused_groups import FusedOptimizerGroups
from library.training.start_position import apply_initial_step, initial_global_step
from library.training.validation import batch_seed, validation_timesteps

OPTIONS = ("initial_epoch", "initial_step", "skip_until_initial_step", "save_n_epoch_ratio", "fused_optimizer_groups",
           "cpu_offload_checkpointing", "validation_split", "validate_every_n_steps", "validate_every_n_epochs")


# ----------------------------------------------------------------------------- validation
def test_validation_timesteps_follow_sd_scripts():
    assert validation_timesteps() == (200, 400, 600, 800)
    assert validation_timesteps(100, 900) == (260, 420, 580, 740)
    assert validation_timesteps(500, 500) == (500, 500, 500, 500)
    assert max(validation_timesteps(990, 1000)) <= 999


def test_validation_batch_seeds_are_distinct_and_stable():
    seeds = [batch_seed(7, i) for i in range(100)]
    assert len(set(seeds)) == 100 and seeds == [batch_seed(7, i) for i in range(100)]
    assert batch_seed(7, 0) != batch_seed(8, 0)


# ----------------------------------------------------------------------------- start position
def _scheduler(total: int = 100):
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1.0)
    return LambdaLR(opt, lambda s: 1.0 - s / total)


def test_initial_step_sets_counters_and_schedule():
    p, sched = TrainProgress(), _scheduler()
    apply_initial_step(p, sched, initial_step=25, initial_epoch=None, skip_batches=True, steps_per_epoch=10,
                       max_steps=100, gradient_accumulation_steps=2)
    assert (p.global_step, p.epoch, p.step_in_epoch) == (25, 2, 10)  # 5 steps x 2 accumulated batches
    assert sched.get_last_lr() == [pytest.approx(0.75)]
    p, sched = TrainProgress(), _scheduler()
    apply_initial_step(p, sched, initial_step=25, initial_epoch=None, skip_batches=False, steps_per_epoch=10,
                       max_steps=100)
    assert (p.global_step, p.epoch, p.step_in_epoch) == (25, 2, 0)  # renumbered, data from the epoch start
    assert sched.get_last_lr() == [pytest.approx(0.75)]


def test_initial_epoch_and_limits():
    assert initial_global_step(None, 3, 10) == 20 and initial_global_step(None, 1, 10) == 0
    assert initial_global_step(7, 3, 10) == 7  # --initial_step wins
    assert initial_global_step(None, None, 10) is None
    with pytest.raises(UserError, match="counts from 1"):
        initial_global_step(None, 0, 10)
    with pytest.raises(UserError, match="not below --max_train_steps"):
        apply_initial_step(TrainProgress(), _scheduler(), initial_step=100, initial_epoch=None, skip_batches=True,
                           steps_per_epoch=10, max_steps=100)
    resumed, sched = TrainProgress(global_step=30), _scheduler()
    for _ in range(30):
        sched.optimizer.step()
        sched.step()
    with pytest.raises(UserError, match="before the resumed state"):
        apply_initial_step(resumed, sched, initial_step=10, initial_epoch=None, skip_batches=True,
                           steps_per_epoch=10, max_steps=100)
    apply_initial_step(resumed, sched, initial_step=40, initial_epoch=None, skip_batches=True,
                       steps_per_epoch=10, max_steps=100)
    assert resumed.global_step == 40 and sched.get_last_lr() == [pytest.approx(0.6)]


def test_save_n_epoch_ratio_rule():
    assert [save_every_n_epochs_for_ratio(10, r) for r in (1, 2, 3, 4, 10, 20)] == [10, 5, 3, 2, 1, 1]


# ----------------------------------------------------------------------------- fused optimizer groups
def _mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.GELU(), torch.nn.Linear(8, 8), torch.nn.GELU(),
                               torch.nn.Linear(8, 3))


def _batches(n: int = 4):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(5, 6, generator=g), torch.randn(5, 3, generator=g)) for _ in range(n)]


def _groups(model):
    params = list(model.parameters())
    return [{"params": params[:3], "lr": 1e-2}, {"params": params[3:], "lr": 3e-3}]  # two lrs, as block_lr makes


def test_fused_groups_match_plain_adamw():
    plain, fused = _mlp(), _mlp()
    opt_a = torch.optim.AdamW(_groups(plain), weight_decay=0.01)
    opt_b = torch.optim.AdamW(_groups(fused), weight_decay=0.01)
    hooks = FusedOptimizerGroups(opt_b, 3)
    assert len(hooks) == 3 and [len(g.params) for g in hooks.groups] == [2, 2, 2]
    for x, y in _batches():
        torch.nn.functional.mse_loss(plain(x), y).backward()
        opt_a.step()
        opt_a.zero_grad()
        torch.nn.functional.mse_loss(fused(x), y).backward()  # the groups step inside backward
        hooks.finish()
        assert all(p.grad is None for p in fused.parameters())
    for a, b in zip(plain.parameters(), fused.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
    assert len(opt_b.state) == 6  # the master optimizer holds every parameter's state (saved states)
    opt_b.load_state_dict(opt_a.state_dict())  # and loads back into the groups
    x, y = _batches(1)[0]
    torch.nn.functional.mse_loss(fused(x), y).backward()
    assert all(opt_b.state[p]["step"].item() == 5 for p in fused.parameters())


def test_fused_groups_clip_per_group_and_step_groups_without_gradients():
    model = _mlp()
    params = list(model.parameters())
    opt = torch.optim.SGD([{"params": params, "lr": 1.0}])
    hooks = FusedOptimizerGroups(opt, 2, max_grad_norm=0.01)
    before = [p.detach().clone() for p in params]
    x, y = _batches(1)[0]
    reference = _mlp()
    torch.nn.functional.mse_loss(reference(x), y).backward()
    torch.nn.functional.mse_loss(model(x), y).backward()
    hooks.finish()
    for members in ([0, 1, 2], [3, 4, 5]):  # each group is clipped to norm 0.01 on its own
        grads = [list(reference.parameters())[i].grad for i in members]
        scale = min(1.0, 0.01 / (torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
                                 + 1e-6))
        for i, g in zip(members, grads):
            torch.testing.assert_close(before[i] - params[i].detach(), g * scale, rtol=1e-5, atol=1e-7)
    # parameters without a gradient do not keep their group from stepping
    before_bias = model[2].bias.detach().clone()  # in group 2 with the last Linear's weight and bias
    model[:4](x).sum().backward()  # the last Linear gets no gradient
    assert hooks.groups[0].ready == 0 and hooks.groups[1].ready == 1  # group 1 stepped, group 2 waits
    hooks.finish()
    assert hooks.groups[1].ready == 0 and not torch.equal(before_bias, model[2].bias)
    assert model[4].weight.grad is None and model[2].bias.grad is None


# ----------------------------------------------------------------------------- offloaded checkpointing
def test_cpu_offload_checkpointing_gives_the_same_loss_and_gradients(tiny_ckpt):
    from library.models.checkpoint_io import load_sdxl
    from library.training.offload_checkpointing import (
        enable_cpu_offload_checkpointing,
        offloaded_checkpoint,
    )

    unet = load_sdxl(tiny_ckpt).unet.train().requires_grad_(True)
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 8, 8, generator=g, requires_grad=True)
    context = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)
    pooled_width = unet.add_embedding.linear_1.in_features - 6 * unet.config.addition_time_embed_dim
    added = {"text_embeds": torch.randn(1, pooled_width, generator=g),
             "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}

    def loss_and_grads():
        unet.zero_grad(set_to_none=True)
        sample.grad = None
        loss = unet(sample, torch.tensor([500]), context, added_cond_kwargs=added).sample.square().mean()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in unet.named_parameters() if p.grad is not None}
        return loss.detach(), grads, sample.grad.clone()

    unet.enable_gradient_checkpointing()
    loss_a, grads_a, input_a = loss_and_grads()
    enable_cpu_offload_checkpointing(unet)
    assert unet.down_blocks[1]._gradient_checkpointing_func is offloaded_checkpoint
    loss_b, grads_b, input_b = loss_and_grads()
    assert torch.equal(loss_a, loss_b) and torch.equal(input_a, input_b)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 0.9 * len(list(unet.parameters()))
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name


# ----------------------------------------------------------------------------- options are no longer ignored
def test_no_option_of_these_is_listed_as_ignored(tmp_path, caplog):
    assert not set(OPTIONS) & set(S.NOT_IMPLEMENTED)
    parser = A.build_trainer_parser("train")
    helps = {a.dest: a.help or "" for a in parser._actions}
    for name in OPTIONS:
        assert "not implemented" not in helps[name] and "ignored" not in helps[name], name
    model = tmp_path / "m.safetensors"
    model.write_bytes(b"x")
    (tmp_path / "data").mkdir()
    argv = ["--pretrained_model_name_or_path", str(model), "--train_data_dir", str(tmp_path / "data"),
            "--output_dir", str(tmp_path / "out"), "--cpu_offload_checkpointing", "--initial_step", "5",
            "--skip_until_initial_step", "--save_n_epoch_ratio", "2", "--fused_optimizer_groups", "4",
            "--validation_split", "0.1", "--validate_every_n_steps", "10"]
    ns = A.parse_args_with_config(parser, argv)
    with caplog.at_level(logging.WARNING, logger="library.config.schema"):
        S.validate_training_args(ns, "train")
    assert "not implemented" not in caplog.text
    assert ns.gradient_checkpointing is True  # offloading what checkpointing keeps needs checkpointing
    bad = argparse.Namespace(**{**vars(ns), "validate_every_n_steps": -1})
    with pytest.raises(UserError, match="validate_every_n_steps"):
        S.validate_training_args(bad, "train")
    off = argparse.Namespace(**{**vars(ns), "validate_every_n_steps": 0})  # sd-scripts' 0: never
    S.validate_training_args(off, "train")
    assert off.validate_every_n_steps is None
