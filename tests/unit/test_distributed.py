"""library.training.distributed: batch positions, metadata, option checks, DeepSpeed options, and gradient
averaging in a real two-process gloo group (the end-to-end launches are in tests/integration/test_multi_process.py)."""

from __future__ import annotations

import os
import socket
import sys
import types

import pytest
import torch

from library.errors import UserError
from library.training import distributed as D
from library.training.config import TrainConfig


def test_n_processes_see_what_one_process_accumulating_n_batches_sees():
    """Batch positions per optimizer step: process p of N at step s == micro-batch p of step s with accumulation N."""
    n = 4
    for step in range(3):
        spread = sorted(D.batch_index(step, p, n) for p in range(n))
        accumulated = [D.batch_index(step * n + m, 0, 1) for m in range(n)]
        assert spread == accumulated
    seeds = {D.noise_seed(1, e, i) for e in range(3) for i in range(50)}
    assert len(seeds) == 150 and D.noise_seed(1, 0, 0) == D.noise_seed(1, 0, 0) != D.noise_seed(2, 0, 0)


def test_batch_metadata_as_sd_scripts_computes_it():
    meta = D.batch_metadata([2, 4], num_batches=41, num_processes=4, gradient_accumulation_steps=3)
    assert meta == {"ss_batch_size_per_device": "4", "ss_total_batch_size": "48", "ss_num_batches_per_epoch": "11"}
    assert D.batch_metadata([1], 7, 1, 1)["ss_num_batches_per_epoch"] == "7"


def test_deepspeed_plugin_from_sd_scripts_options():
    cfg = TrainConfig(deepspeed=True, zero_stage=3, offload_optimizer_device="cpu", offload_param_device="cpu",
                      zero3_save_16bit_model=True, gradient_accumulation_steps=2, max_grad_norm=0.5,
                      mixed_precision="fp16", fp16_master_weights_and_gradients=True)
    ds = D.deepspeed_plugin(cfg).deepspeed_config
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_optimizer"]["device"] == "cpu"
    assert zero["offload_param"]["device"] == "cpu" and zero["stage3_gather_16bit_weights_on_model_save"] is True
    assert ds["gradient_accumulation_steps"] == 2 and ds["gradient_clipping"] == 0.5
    assert ds["fp16"]["fp16_master_weights_and_grads"] is True
    plain = D.deepspeed_plugin(TrainConfig(deepspeed=True, max_grad_norm=0.0)).deepspeed_config
    assert plain["zero_optimization"]["stage"] == 2 and "gradient_clipping" not in plain


def test_sharding_option_checks(monkeypatch):
    D.check_options(False, True, "lora")  # plain multi-process: everything goes
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # the package is not installed
    with pytest.raises(UserError, match=r"pip install -e \.\[deepspeed\]"):
        D.check_options(True, False, "checkpoint")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(UserError, match="shards full fine-tuning"):
        D.check_options(False, False, "lora")
    with pytest.raises(UserError, match="--fused_backward_pass cannot be combined with FSDP"):
        D.check_options(False, True, "checkpoint")
    with pytest.raises(UserError, match="--ema cannot"):
        D.check_options(False, False, "checkpoint", ema=True)
    D.check_options(False, False, "checkpoint")
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    monkeypatch.setitem(sys.modules, "deepspeed", types.ModuleType("deepspeed"))  # installed
    with pytest.raises(UserError, match="--zero_stage 3 cannot train the text encoders"):
        D.check_options(True, False, "checkpoint", zero_stage=3, trains_text_encoders=True)
    D.check_options(True, False, "checkpoint", zero_stage=2, trains_text_encoders=True)
    D.check_options(True, False, "checkpoint", zero_stage=3)


def test_posterior_sample_is_the_same_whatever_the_batch():
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    from library.data.cachers import sample_posterior_per_image

    pixels = torch.rand(3, 3, 16, 16)
    params = torch.randn(3, 8, 2, 2)  # mean and logvar of 4 channels
    together = sample_posterior_per_image(DiagonalGaussianDistribution(params), pixels, seed=5)
    alone = sample_posterior_per_image(DiagonalGaussianDistribution(params[2:]), pixels[2:], seed=5)
    assert torch.equal(together[2:], alone)
    noise = (together - params[:, :4]) / torch.exp(0.5 * params[:, 4:])
    assert not torch.allclose(noise[0], noise[1])  # each image its own noise ...
    other = sample_posterior_per_image(DiagonalGaussianDistribution(params), pixels, seed=6)
    assert not torch.equal(other, together)  # ... and the seed matters


def test_materialize_rebuilds_models_with_given_weights(tiny_ckpt):
    """What saving under FSDP/ZeRO-3 does with the gathered weights: a plain module of the same class."""
    from library.models.checkpoint_io import load_sdxl

    models = load_sdxl(str(tiny_ckpt), dtype=torch.float32, device="cpu")
    for module in (models.unet, models.text_encoder1, models.text_encoder2):
        state = {k: v + 1 for k, v in module.state_dict().items() if v.is_floating_point()}
        fresh = D.materialize(module, state)
        assert type(fresh) is type(module) and fresh is not module
        got = fresh.state_dict()
        assert all(torch.equal(got[k], v) for k, v in state.items())
    with pytest.raises(RuntimeError, match="do not fit"):
        D.materialize(models.unet, {"nonsense.weight": torch.zeros(1)})


# --- a real two-process gloo group ----------------------------------------------------------------

def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(8, 5, generator=g), torch.randn(8, 3, generator=g)


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))


def _loss(model, x, y):
    return ((model(x) - y) ** 2).mean()


def _worker(rank: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        from library.training.fused_backward import FusedBackward

        x, y = _data()
        half = slice(4 * rank, 4 * rank + 4)
        differing = torch.nn.Linear(2, 2)  # (no common seed): process 1 takes process 0's weights
        torch.nn.init.constant_(differing.weight, float(rank))
        D.broadcast_from_main(list(differing.parameters()))
        assert torch.equal(differing.weight, torch.zeros(2, 2))
        # GradientAverager: the mean of both halves' gradients
        model = _model()
        _loss(model, x[half], y[half]).backward()
        model[0].bias.grad = None if rank == 0 else model[0].bias.grad  # a gradient on one process only
        D.GradientAverager(list(model.parameters()))()
        grads = [p.grad.clone() for p in model.parameters()]
        # the fused backward pass, each gradient averaged in its hook before the step
        model = _model()
        opt = torch.optim.AdamW(model.parameters(), lr=0.1)
        fused = FusedBackward(opt, grad_reduce=D.average_grad)
        _loss(model, x[half], y[half]).backward()
        fused.remove()
        # numpy copies: tensors sent through a queue are shared memory that dies with this process
        queue.put((rank, [g.numpy().copy() for g in grads], [p.detach().numpy().copy() for p in model.parameters()]))
        queue.close()
        queue.join_thread()  # the results have left this process
        torch.distributed.barrier()  # neither process closes its connections while the other still talks
    finally:
        torch.distributed.destroy_process_group()
    # Skip the interpreter's teardown: under load, gloo's threads have aborted there (SIGABRT, "terminate called
    # without an active exception") after everything above had finished; that is torch's teardown, not our code.
    os._exit(0)


@pytest.mark.slow  # two spawned interpreters
def test_gradients_and_fused_steps_agree_with_one_process_on_the_whole_batch():
    mp = torch.multiprocessing.get_context("spawn")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    queue = mp.Queue()
    procs = [mp.Process(target=_worker, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = {r: (g, w) for r, g, w in (queue.get(timeout=120) for _ in procs)}
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    x, y = _data()
    model = _model()
    grads_per_half = []
    for half in (slice(0, 4), slice(4, 8)):
        model.zero_grad()
        _loss(model, x[half], y[half]).backward()
        grads_per_half.append([p.grad.clone() for p in model.parameters()])
    expected = [(a + b) / 2 for a, b in zip(*grads_per_half)]
    expected[1] = grads_per_half[1][1] / 2  # the bias gradient process 0 dropped counts as zeros there
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    _loss(model, x, y).backward()  # equal halves: the whole-batch mean loss has the mean gradient
    opt.step()
    for rank in (0, 1):
        grads, weights = results[rank]
        for got, want in zip(grads, expected):
            torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-5, atol=1e-7)
        for got, want in zip(weights, model.parameters()):
            torch.testing.assert_close(torch.from_numpy(got), want.detach(), rtol=1e-5, atol=1e-6)
