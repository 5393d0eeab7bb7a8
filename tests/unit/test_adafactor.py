"""The batched Adafactor computes transformers' Adafactor update, keeps its state layout, and is what
``--optimizer_type Adafactor`` builds (``foreach=False`` in --optimizer_args keeps transformers' loop)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers.optimization import Adafactor as TransformersAdafactor

from library.training import adafactor as batched
from library.training import optim as O

SHAPES = [(8, 64), (8, 64), (8, 64), (64, 8), (64, 8), (16,), (16,), (4, 3, 3, 3), (4, 3, 3, 3), (32, 32), (5,)]
CONFIGS = [
    dict(lr=1e-2, scale_parameter=False, relative_step=False, warmup_init=False),  # the brief's recipe
    dict(),  # transformers' defaults: relative step, parameter scaling
    dict(relative_step=True, warmup_init=True),
    dict(lr=1e-2, scale_parameter=True, relative_step=False, beta1=0.9, weight_decay=0.01),
]


def _params(dtype: torch.dtype) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in SHAPES]


def _train(opt_cls, params, steps=4, **kwargs):
    opt = opt_cls(params, **kwargs)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(p.dtype)
        opt.step()
    return opt


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kwargs", CONFIGS)
def test_same_update_and_state_as_transformers(kwargs, dtype):
    ref_params, our_params = _params(dtype), _params(dtype)
    ref = _train(TransformersAdafactor, ref_params, **kwargs)
    ours = _train(batched.Adafactor, our_params, **kwargs)
    if dtype == torch.float32:  # (warmup_init's 1e-6 steps vanish in bf16)
        assert not any(torch.equal(a, b) for a, b in zip(our_params, _params(dtype)))  # every tensor stepped
    exact = not kwargs.get("weight_decay")  # weight decay is one multiply-add instead of add(alpha=)
    for a, b in zip(ref_params, our_params):
        if exact:
            assert torch.equal(a, b)  # bit for bit on the CPU
        else:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    ref_state, our_state = ref.state_dict()["state"], ours.state_dict()["state"]
    for i, state in ref_state.items():
        assert set(state) == set(our_state[i]) and state["step"] == our_state[i]["step"]
        for key in state:
            if torch.is_tensor(state[key]) and key != "RMS":
                assert state[key].shape == our_state[i][key].shape and our_state[i][key].dtype == torch.float32
                torch.testing.assert_close(state[key], our_state[i][key], rtol=1e-6, atol=0)


def test_state_resumes_across_implementations_and_small_chunks(monkeypatch):
    """A transformers state loaded into ours (and chunked batches) continues exactly like transformers."""
    kwargs = CONFIGS[0]
    ref_params, our_params = _params(torch.float32), _params(torch.float32)
    ref = _train(TransformersAdafactor, ref_params, steps=2, **kwargs)
    for a, b in zip(ref_params, our_params):
        b.data.copy_(a.data)
    ours = batched.Adafactor(our_params, **kwargs)
    ours.load_state_dict(copy.deepcopy(ref.state_dict()))  # as from a file: no shared tensors
    monkeypatch.setattr(batched, "CHUNK_ELEMENTS", 600)  # several chunks per shape batch
    g = torch.Generator().manual_seed(5)
    for _ in range(2):
        for a, b in zip(ref_params, our_params):
            a.grad = torch.randn(a.shape, generator=g)
            b.grad = a.grad.clone()
        ref.step()
        ours.step()
    assert all(torch.equal(a, b) for a, b in zip(ref_params, our_params))


def test_build_optimizer_uses_the_batched_class_unless_foreach_false():
    params = _params(torch.float32)
    args = O.parse_optimizer_args(["scale_parameter=False", "relative_step=False", "warmup_init=False"])
    opt, desc = O.build_optimizer("Adafactor", params, 1e-3, args)
    assert type(opt) is batched.Adafactor
    assert desc.startswith("transformers.optimization.Adafactor(")  # sd-scripts' ss_optimizer metadata
    loop, _ = O.build_optimizer("Adafactor", params, 1e-3, {**args, "foreach": False})
    assert type(loop) is TransformersAdafactor
    managed, _ = O.build_optimizer("Adafactor", params, 1e-3, {})
    assert O.optimizer_manages_lr(managed)  # relative_step: the adafactor scheduler still applies
    sched = O.build_lr_scheduler("constant", managed, 10, 0)
    rms = float(params[0].detach().pow(2).mean().sqrt())
    for p in params:
        p.grad = torch.ones_like(p)
    managed.step()
    sched.step()
    assert sched.get_last_lr()[0] == pytest.approx(1e-2 * rms, rel=1e-5)  # min(1e-2, 1/sqrt(1)) * RMS(p)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kwargs", CONFIGS)
def test_factors_from_tensors_give_the_same_update(kwargs, dtype):
    """CUDA graphs replay the update reading the step's factors from tensors: the same update, bit for
    bit on the CPU (weight decay: one multiply-add instead of add(alpha=), a rounding apart)."""
    host_params, tensor_params = _params(dtype), _params(dtype)
    _train(batched.Adafactor, host_params, **kwargs)
    opt = batched.Adafactor(tensor_params, **kwargs)
    opt.use_device_factors(torch.device("cpu"))
    g = torch.Generator().manual_seed(1)
    for i in range(4):
        opt.fill_device_factors(opt.steps_taken() + 1)
        for p in tensor_params:
            p.grad = torch.randn(p.shape, generator=g).to(p.dtype)
        opt.step()
    for a, b in zip(host_params, tensor_params):
        if kwargs.get("weight_decay"):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 if dtype == torch.float32 else 1e-2)
        else:
            assert torch.equal(a, b)
    assert all(s["step"] == 4 for s in opt.state.values())  # the host count goes on as before


def test_rms_is_one_tensor_per_state_written_in_place():
    """A CUDA graph replaying the update writes the RMS tensor the state holds, so it must stay the same object."""
    params = _params(torch.float32)
    opt = batched.Adafactor(params, **CONFIGS[1])  # parameter scaling: RMS is computed
    g = torch.Generator().manual_seed(3)
    held = None
    for _ in range(3):
        before = [p.detach().clone() for p in params]
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
        rms = [opt.state[p]["RMS"] for p in params]
        if held is not None:
            assert all(a is b for a, b in zip(held, rms))
        held = rms
        for w, value in zip(before, rms):  # the RMS of the weights the step started from
            torch.testing.assert_close(value, w.norm() / w.numel() ** 0.5)
    opt.state[params[0]]["RMS"] = 0.5  # a loaded state may hold a number: it becomes a tensor again
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    opt.step()
    assert torch.is_tensor(opt.state[params[0]]["RMS"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_step_param_is_step_for_one_tensor(dtype):
    """The fused backward pass's per-tensor update is the full step's update, bit for bit."""
    g = torch.Generator().manual_seed(3)
    a = torch.randn(6, 5, generator=g).to(dtype).requires_grad_()
    b = a.detach().clone().requires_grad_()
    full = batched.Adafactor([a], **CONFIGS[0])
    one = batched.Adafactor([b], **CONFIGS[0])
    for _ in range(3):
        a.grad = torch.randn(6, 5, generator=g).to(dtype)
        b.grad = a.grad.clone()
        full.step()
        with torch.no_grad():
            one.step_param(b, one.param_groups[0])
    assert torch.equal(a, b) and one.state[b]["step"] == full.state[a]["step"] == 3
