"""Optimizer / scheduler registries and the fused backward pass (library.training.optim)."""

from __future__ import annotations

import copy
import importlib.abc
import io
import math
import pickle
import sys

import pytest
import torch
from torch import nn

from library.errors import UserError
from library.training import optim as O
from library.training import fused_backward as FB

BRIEF_ADAFACTOR_ARGS = ["scale_parameter=False", "relative_step=False", "warmup_init=False"]


def _params(n: int = 2) -> list[nn.Parameter]:
    torch.manual_seed(0)
    return [nn.Parameter(torch.randn(3, 3)) for _ in range(n)]


# ------------------------------------------------------------------------------ argument parsing


def test_parse_optimizer_args_literal_values_and_raw_strings():
    args = O.parse_optimizer_args(
        ["weight_decay=0.01", "betas=0.9,0.999", "relative_step=False", "d_coef = 2", "mode=fast", "eps=1e-8"]
    )
    assert args == {
        "weight_decay": 0.01,
        "betas": (0.9, 0.999),
        "relative_step": False,
        "d_coef": 2,
        "mode": "fast",
        "eps": 1e-8,
    }
    assert O.parse_optimizer_args(None) == {}
    assert O.parse_optimizer_args(["expr=a=b"]) == {"expr": "a=b"}  # only the first '=' splits
    assert O.parse_optimizer_args("relative_step=False warmup_init=False") == {
        "relative_step": False, "warmup_init": False}


@pytest.mark.parametrize("bad", ["weight_decay", "=0.1", "two words=1"])
def test_parse_optimizer_args_malformed_names_the_option(bad):
    with pytest.raises(UserError, match="--optimizer_args"):
        O.parse_optimizer_args([bad])


# ------------------------------------------------------------------------------ optimizer registry


@pytest.mark.parametrize("name", ["", None, "AdamW", "adamw", "ADAMW"])
def test_adamw_is_default_and_case_insensitive(name):
    opt, desc = O.build_optimizer(name, _params(), 1e-3, {})
    assert type(opt) is torch.optim.AdamW
    assert opt.param_groups[0]["lr"] == 1e-3
    assert desc.endswith("AdamW()")


def test_sgdnesterov_defaults_momentum_and_forces_nesterov():
    opt, desc = O.build_optimizer("sgdnesterov", _params(), 0.1, {})
    assert type(opt) is torch.optim.SGD
    assert opt.defaults["momentum"] == 0.9 and opt.defaults["nesterov"] is True
    assert "momentum=0.9" in desc
    opt, _ = O.build_optimizer("SGDNesterov", _params(), 0.1, {"momentum": 0.5})
    assert opt.defaults["momentum"] == 0.5


def test_adafactor_with_brief_args_builds_and_steps():
    from library.training.adafactor import Adafactor  # transformers' update, batched over tensors

    params = _params()
    before = [p.detach().clone() for p in params]
    args = O.parse_optimizer_args(BRIEF_ADAFACTOR_ARGS)
    opt, desc = O.build_optimizer("adafactor", params, 1e-2, args)
    assert isinstance(opt, Adafactor)
    assert desc == "transformers.optimization.Adafactor(scale_parameter=False,relative_step=False,warmup_init=False)"
    assert not O.optimizer_manages_lr(opt)
    assert opt.param_groups[0]["lr"] == 1e-2
    sum((p * p).sum() for p in params).backward()
    opt.step()
    for p, b in zip(params, before):
        assert not torch.equal(p, b)
        # relative_step=False, scale_parameter=False: the update's RMS is clipped to 1, times lr
        rms = (p - b).pow(2).mean().sqrt()
        assert 0.1e-2 < rms <= 1.01e-2
    sched = O.build_lr_scheduler("constant_with_warmup", opt, 1000, 100)
    assert isinstance(sched, torch.optim.lr_scheduler.LambdaLR)
    assert opt.param_groups[0]["lr"] == 0.0  # warmup starts at 0


def test_adafactor_relative_step_manages_lr_and_forces_its_scheduler():
    from transformers.optimization import AdafactorSchedule

    params = _params()
    groups = [{"params": [params[0]], "lr": 1e-3}, {"params": [params[1]], "lr": 2e-3}]
    opt, desc = O.build_optimizer("Adafactor", groups, 1e-3, {})
    assert "relative_step=True" in desc
    assert O.optimizer_manages_lr(opt)
    assert all(g["lr"] is None for g in opt.param_groups)
    assert groups[0]["lr"] == 1e-3  # caller's groups untouched
    sched = O.build_lr_scheduler("cosine", opt, 100, 0)
    assert isinstance(sched, AdafactorSchedule)
    assert sched.get_last_lr() == [1e-3, 1e-3]  # initial lr shown before the first step
    pickle.dumps(sched)


def test_adafactor_scheduler_needs_adafactor():
    opt, _ = O.build_optimizer("AdamW", _params(), 1e-3, {})
    with pytest.raises(UserError, match="Adafactor"):
        O.build_lr_scheduler("adafactor", opt, 100, 0)


class _Missing(importlib.abc.MetaPathFinder):
    """Finds nothing for one top-level package: importing it fails as when it is not installed."""

    def __init__(self, package: str):
        self.package = package

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] == self.package:
            raise ModuleNotFoundError(f"No module named {self.package!r}", name=self.package)
        return None


def hide_package(monkeypatch, package: str) -> None:
    """Make ``package`` import as if it were not installed, whether or not it is on this machine."""
    for name in [n for n in sys.modules if n.split(".")[0] == package]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [_Missing(package), *sys.meta_path])


@pytest.mark.parametrize(
    "name",
    ["AdamW8bit", "adamw8bit", "PagedAdamW", "PagedAdamW8bit", "PagedAdamW32bit", "Lion8bit", "PagedLion8bit",
     "SGDNesterov8bit", "RMSprop8bit", "Adagrad8bit", "bitsandbytes.optim.AdEMAMix8bit"],
)
def test_8bit_optimizers_without_bitsandbytes_say_how_to_install(name, monkeypatch):
    hide_package(monkeypatch, "bitsandbytes")
    with pytest.raises(UserError) as info:
        O.build_optimizer(name, _params(), 1e-3, {})
    message = str(info.value)
    assert "pip install bitsandbytes" in message and "\n" not in message


@pytest.mark.parametrize(
    "name,package",
    [("DAdaptation", "dadaptation"), ("DAdaptAdam", "dadaptation"), ("dadaptlion", "dadaptation"),
     ("Prodigy", "prodigyopt"), ("Lion", "lion-pytorch"), ("AdamWScheduleFree", "schedulefree")],
)
def test_optional_packages_say_how_to_install(name, package, monkeypatch):
    module = {"lion-pytorch": "lion_pytorch"}.get(package, package)
    hide_package(monkeypatch, module)
    with pytest.raises(UserError, match=f"pip install {package}"):
        O.build_optimizer(name, _params(), 1.0, {})


def test_dotted_path_and_bare_torch_names():
    opt, desc = O.build_optimizer("torch.optim.RMSprop", _params(), 1e-3, {"alpha": 0.9})
    assert type(opt) is torch.optim.RMSprop and opt.defaults["alpha"] == 0.9
    assert desc == "torch.optim.rmsprop.RMSprop(alpha=0.9)"
    opt, _ = O.build_optimizer("NAdam", _params(), 1e-3, {})
    assert type(opt) is torch.optim.NAdam
    opt, _ = O.build_optimizer("radam", _params(), 1e-3, {})  # torch.optim names, case-insensitive too
    assert type(opt) is torch.optim.RAdam


def test_unknown_optimizer_lists_choices():
    with pytest.raises(UserError) as info:
        O.build_optimizer("NoSuchOptimizer", _params(), 1e-3, {})
    assert "AdamW" in str(info.value) and "Adafactor" in str(info.value) and "Prodigy" in str(info.value)
    with pytest.raises(UserError, match="no attribute"):
        O.build_optimizer("torch.optim.NoSuch", _params(), 1e-3, {})


def test_bad_optimizer_args_are_user_errors():
    with pytest.raises(UserError, match="--optimizer_args"):
        O.build_optimizer("AdamW", _params(), 1e-3, {"not_an_arg": 1})
    with pytest.raises(UserError, match="--learning_rate"):
        O.build_optimizer("AdamW", _params(), 1e-3, {"lr": 1})


def test_per_group_lrs_are_kept():
    a, b = _params()
    opt, _ = O.build_optimizer("AdamW", [{"params": [a], "lr": 1e-3}, {"params": [b]}], 5e-4, {})
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 5e-4]


def test_legacy_flags():
    assert O.resolve_legacy_optimizer_flags(None) == "AdamW"
    assert O.resolve_legacy_optimizer_flags("", use_8bit_adam=True) == "AdamW8bit"
    assert O.resolve_legacy_optimizer_flags("", use_lion_optimizer=True) == "Lion"
    assert O.resolve_legacy_optimizer_flags("Adafactor") == "Adafactor"
    with pytest.raises(UserError, match="--use_8bit_adam"):
        O.resolve_legacy_optimizer_flags("Lion", use_8bit_adam=True)
    with pytest.raises(UserError):
        O.resolve_legacy_optimizer_flags(None, use_8bit_adam=True, use_lion_optimizer=True)


# ------------------------------------------------------------------------------ schedulers


def _lrs(name, steps, total=100, warmup=0, lr=1.0, **kwargs):
    """lr after stepping the scheduler s times, for each s in steps."""
    opt = torch.optim.SGD(_params(1), lr=lr)
    sched = O.build_lr_scheduler(name, opt, total, warmup, **kwargs)
    out, current = [], 0
    for target in steps:
        while current < target:
            opt.step()
            sched.step()
            current += 1
        out.append(opt.param_groups[0]["lr"])
    return out


def _cos(progress, cycles=0.5):
    return 0.5 * (1 + math.cos(math.pi * 2 * cycles * progress))


@pytest.mark.parametrize(
    "name,kwargs,steps,expected",
    [
        ("constant", {}, [0, 50, 100], [1, 1, 1]),
        ("constant_with_warmup", {"warmup": 10}, [0, 5, 10, 80], [0, 0.5, 1, 1]),
        ("linear", {"warmup": 10}, [5, 10, 55, 100], [0.5, 1, 0.5, 0]),
        ("cosine", {"warmup": 10}, [5, 10, 55, 100], [0.5, 1, 0.5, 0]),
        ("cosine_with_restarts", {"warmup": 10, "num_cycles": 2}, [32, 55, 100],
         [_cos((2 * 22 / 90) % 1), 1.0, 0.0]),
        ("polynomial", {"warmup": 10, "power": 2.0}, [5, 55, 100],
         [0.5, (1 - 1e-7) * 0.25 + 1e-7, 1e-7]),
        ("inverse_sqrt", {"warmup": 10}, [5, 10, 40], [0.5, 1, 0.5]),
        ("cosine_with_min_lr", {"warmup": 10, "min_lr_ratio": 0.1}, [55, 100], [0.55, 0.1]),
        ("warmup_stable_decay", {"warmup": 10, "num_decay_steps": 20}, [5, 50, 90, 100], [0.5, 1, 0.5, 0]),
        ("warmup_stable_decay", {"warmup": 10, "num_decay_steps": 0.2, "min_lr_ratio": 0.2}, [90, 100],
         [0.2 + 0.8 * 0.5, 0.2]),
        ("piecewise_constant", {"scheduler_args": {"step_rules": "1:10,0.1:20,0.01"}}, [5, 10, 19, 20, 60],
         [1, 0.1, 0.1, 0.01, 0.01]),
    ],
)
def test_scheduler_lrs(name, kwargs, steps, expected):
    kwargs = dict(kwargs)
    warmup = kwargs.pop("warmup", 0)
    assert _lrs(name, steps, warmup=warmup, **kwargs) == pytest.approx(expected, abs=1e-9)


def test_piecewise_constant_matches_diffusers():
    from diffusers.optimization import get_piecewise_constant_schedule

    rules = "1:10,0.5:30,0.1:20,0.01"
    ours = _lrs("piecewise_constant", range(0, 50, 3), scheduler_args={"step_rules": rules})
    opt = torch.optim.SGD(_params(1), lr=1.0)
    ref = get_piecewise_constant_schedule(opt, rules)
    theirs = [ref.lr_lambdas[0](s) for s in range(0, 50, 3)]
    assert ours == pytest.approx(theirs)


@pytest.mark.parametrize("warmup", [10, 0.1, "10%", "0.1", "10"])
def test_warmup_as_count_ratio_or_percent(warmup):
    assert _lrs("constant_with_warmup", [5, 10], total=100, warmup=warmup) == pytest.approx([0.5, 1.0])


def test_resolve_warmup_steps():
    assert O.resolve_warmup_steps(None, 100) == 0
    assert O.resolve_warmup_steps(25, 100) == 25
    assert O.resolve_warmup_steps(0.25, 1000) == 250
    assert O.resolve_warmup_steps("5%", 1000) == 50
    assert O.resolve_warmup_steps(100.0, 1000) == 100
    for bad in ["abc", -1, "150%", 1.5, True]:
        with pytest.raises(UserError, match="--lr_warmup_steps"):
            O.resolve_warmup_steps(bad, 100)


def test_scheduler_errors_are_user_errors():
    opt = torch.optim.SGD(_params(1), lr=1.0)
    with pytest.raises(UserError, match="constant_with_warmup"):
        O.build_lr_scheduler("constant", opt, 100, 10)
    with pytest.raises(UserError, match="not known"):
        O.build_lr_scheduler("sawtooth", opt, 100, 0)
    with pytest.raises(UserError, match="step_rules"):
        O.build_lr_scheduler("piecewise_constant", opt, 100, 0)
    with pytest.raises(UserError, match="min_lr_ratio"):
        O.build_lr_scheduler("cosine_with_min_lr", opt, 100, 10)
    with pytest.raises(UserError, match="lr_decay_steps"):
        O.build_lr_scheduler("warmup_stable_decay", opt, 100, 60, num_decay_steps=60)
    with pytest.raises(UserError, match="--lr_scheduler_args"):
        O.build_lr_scheduler("linear", opt, 100, 10, scheduler_args={"bogus": 1})


def test_custom_scheduler_type_with_args():
    opt = torch.optim.SGD(_params(1), lr=1.0)
    sched = O.build_lr_scheduler("constant", opt, 100, 0, scheduler_args={"step_size": 10, "gamma": 0.5},
                                 scheduler_type="torch.optim.lr_scheduler.StepLR")
    assert isinstance(sched, torch.optim.lr_scheduler.StepLR)
    for _ in range(25):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.25)
    sched = O.build_lr_scheduler("", torch.optim.SGD(_params(1), lr=1.0), 100, 0,
                                 scheduler_args={"gamma": 0.9}, scheduler_type="ExponentialLR")
    assert isinstance(sched, torch.optim.lr_scheduler.ExponentialLR)
    with pytest.raises(UserError, match="--lr_warmup_steps"):
        O.build_lr_scheduler("constant", opt, 100, 5, scheduler_args={"step_size": 1}, scheduler_type="StepLR")


_ALL = [
    ("constant", 0, {}), ("constant_with_warmup", 10, {}), ("linear", 10, {}), ("cosine", 10, {}),
    ("cosine_with_restarts", 10, {"num_cycles": 3}), ("polynomial", 10, {}), ("inverse_sqrt", 10, {}),
    ("cosine_with_min_lr", 10, {"min_lr_ratio": 0.1}), ("warmup_stable_decay", 10, {"num_decay_steps": 20}),
    ("piecewise_constant", 0, {"scheduler_args": {"step_rules": "1:10,0.1:20,0.01"}}),
]


@pytest.mark.parametrize("name,warmup,kwargs", _ALL)
def test_scheduler_state_dict_round_trip_and_pickle(name, warmup, kwargs):
    def make():
        opt = torch.optim.AdamW(_params(1), lr=1e-3)
        return opt, O.build_lr_scheduler(name, opt, 100, warmup, **kwargs)

    opt, sched = make()
    for _ in range(37):
        opt.step()
        sched.step()
    buffer = io.BytesIO()
    torch.save(sched.state_dict(), buffer)  # what accelerate.save_state does
    buffer.seek(0)
    opt2, sched2 = make()
    sched2.load_state_dict(torch.load(buffer, weights_only=False))
    opt2.load_state_dict(opt.state_dict())
    for _ in range(5):
        opt.step()
        sched.step()
        opt2.step()
        sched2.step()
    assert sched2.last_epoch == sched.last_epoch == 42
    assert sched2.get_last_lr() == pytest.approx(sched.get_last_lr())
    clone = pickle.loads(pickle.dumps(sched))
    assert clone.last_epoch == 42


# ------------------------------------------------------------------------------ fused backward


def _model() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))


def _batches(n=6):
    gen = torch.Generator().manual_seed(2)
    return [(torch.randn(8, 6, generator=gen), torch.randn(8, 3, generator=gen)) for _ in range(n)]


def _groups(model, lrs):
    return [{"params": list(model[0].parameters()) + list(model[2].parameters()), "lr": lrs[0]},
            {"params": list(model[4].parameters()), "lr": lrs[1]}]


def _train(optimizer_type, args, lrs, fused, max_grad_norm=None, scheduler="linear", model=None, steps=6):
    model = model or _model()
    opt, _ = O.build_optimizer(optimizer_type, _groups(model, lrs), lrs[0], dict(args))
    sched = O.build_lr_scheduler(scheduler, opt, steps, 2 if scheduler != "constant" else 0)
    fb = FB.fused_backward_step(opt, max_grad_norm=max_grad_norm) if fused else None
    for x, y in _batches(steps):
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        if fused:
            assert all(p.grad is None for p in model.parameters())  # stepped and freed inside backward
        else:
            if max_grad_norm:
                for p in model.parameters():  # the fused pass clips per tensor
                    torch.nn.utils.clip_grad_norm_(p, max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
        sched.step()
    return model, opt, fb


def _assert_same(m1, m2, atol=1e-6):
    for (name, a), b in zip(m1.named_parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, atol=atol, rtol=1e-5, msg=name)


def test_fused_adamw_matches_normal_training_with_per_group_lrs():
    lrs = (1e-2, 1e-4)
    args = {"weight_decay": 0.05, "betas": (0.9, 0.99)}
    normal, _, _ = _train("AdamW", args, lrs, fused=False)
    fused, opt, fb = _train("AdamW", args, lrs, fused=True)
    _assert_same(normal, fused)
    assert len(fb) == 6  # 3 linears x (weight, bias)
    # the last step ran at 1/4 of the base lrs (linear: warmup 2, 6 steps, step index 5)
    used = sorted({sub.param_groups[0]["lr"] for sub in fb.param_optimizers})
    assert used == pytest.approx(sorted(lr * 0.25 for lr in lrs))
    # the per-group lrs matter: swapping them changes the result
    swapped, _, _ = _train("AdamW", args, lrs[::-1], fused=True)
    assert not torch.allclose(swapped[4].weight, fused[4].weight)
    assert len(opt.state_dict()["state"]) == 6  # full state visible to save_state


def test_fused_adamw_with_per_tensor_clipping():
    normal, _, _ = _train("AdamW", {}, (1e-2, 1e-3), fused=False, max_grad_norm=0.05)
    fused, _, _ = _train("AdamW", {}, (1e-2, 1e-3), fused=True, max_grad_norm=0.05)
    _assert_same(normal, fused)
    unclipped, _, _ = _train("AdamW", {}, (1e-2, 1e-3), fused=True)
    assert not torch.allclose(unclipped[0].weight, fused[0].weight)


@pytest.mark.parametrize("relative_step", [False, True])
def test_fused_adafactor_matches_normal_training(relative_step):
    args = O.parse_optimizer_args(BRIEF_ADAFACTOR_ARGS if not relative_step else [])
    scheduler = "constant_with_warmup" if not relative_step else "constant"
    normal, _, _ = _train("Adafactor", args, (1e-2, 1e-3), fused=False, scheduler=scheduler)
    fused, _, _ = _train("Adafactor", args, (1e-2, 1e-3), fused=True, scheduler=scheduler)
    _assert_same(normal, fused)
    assert not torch.allclose(normal[0].weight, _model()[0].weight)  # it did train


def test_fused_state_survives_save_and_load():
    lrs = (1e-2, 1e-3)
    model, opt, fb = _train("AdamW", {}, lrs, fused=True, scheduler="constant", steps=3)
    state = copy.deepcopy(opt.state_dict())
    twin = copy.deepcopy(model)
    twin_opt, _ = O.build_optimizer("AdamW", _groups(twin, lrs), lrs[0], {})
    twin_fb = FB.FusedBackward(twin_opt)
    twin_opt.load_state_dict(state)  # through the master optimizer, as accelerate.load_state does
    for x, y in _batches(2):
        for m in (model, twin):
            nn.functional.mse_loss(m(x), y).backward()
    _assert_same(model, twin)
    assert int(twin_opt.state[twin[0].weight]["step"]) == 5
    twin_fb.remove()
    nn.functional.mse_loss(twin(_batches(1)[0][0]), _batches(1)[0][1]).backward()
    assert twin[0].weight.grad is not None  # hooks gone: gradients stay for a normal step


@pytest.mark.parametrize("max_grad_norm", [None, 0.05])
def test_fused_adafactor_from_device_scalars_matches_host_scalars(max_grad_norm):
    """The mode CUDA graphs use: lrs and the step number in tensors filled before each step."""
    args = O.parse_optimizer_args(BRIEF_ADAFACTOR_ARGS)
    host, _, _ = _train("Adafactor", args, (1e-2, 1e-3), fused=True, max_grad_norm=max_grad_norm)
    model = _model()
    opt, _ = O.build_optimizer("Adafactor", _groups(model, (1e-2, 1e-3)), 1e-2, dict(args))
    sched = O.build_lr_scheduler("linear", opt, 6, 2)
    fb = FB.FusedBackward(opt, max_grad_norm=max_grad_norm)
    assert fb.graph_blocker() is None
    fb.use_device_scalars(torch.device("cpu"))
    for x, y in _batches(6):
        fb.before_step()
        before = fb.probe().clone()
        nn.functional.mse_loss(model(x), y).backward()
        fb.after_step()
        assert not torch.equal(before, fb.probe())  # what the graph check reads: every step changes it
        sched.step()
    _assert_same(host, model, atol=1e-6)
    assert {int(s["step"]) for s in opt.state.values()} == {6}
    assert float(fb.factors[1]["rel"]) == pytest.approx(1e-3 * 0.25)  # the last step's lr (linear, warmup 2)


def test_fused_backward_graph_blocker():
    model = _model()
    adamw, _ = O.build_optimizer("AdamW", _groups(model, (1e-3, 1e-3)), 1e-3, {})
    assert "Adafactor only" in FB.FusedBackward(adamw).graph_blocker()
    model = _model()
    ada, _ = O.build_optimizer("Adafactor", _groups(model, (1e-3, 1e-3)), 1e-3,
                               O.parse_optimizer_args(BRIEF_ADAFACTOR_ARGS))
    assert "processes" in FB.FusedBackward(ada, grad_reduce=lambda p: None).graph_blocker()


def test_fused_backward_support_and_checks():
    for name in ["AdamW", "adafactor", "Lion", "AdamW8bit", "SGDNesterov", "torch.optim.RAdam"]:
        assert FB.optimizer_supports_fused_backward(name), name
    for name in ["Prodigy", "DAdaptAdam", "dadaptation", "AdamWScheduleFree", "some.pkg.ProdigyPlus"]:
        assert not FB.optimizer_supports_fused_backward(name), name
    FB.check_fused_backward("Adafactor", 1, "bf16")
    with pytest.raises(UserError, match="gradient_accumulation_steps"):
        FB.check_fused_backward("Adafactor", 4)
    with pytest.raises(UserError, match="Prodigy"):
        FB.check_fused_backward("Prodigy")
    with pytest.raises(UserError, match="fp16"):
        FB.check_fused_backward("AdamW", 1, "fp16")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name,args", [("AdamW", []), ("Adafactor", BRIEF_ADAFACTOR_ARGS)])
def test_fused_backward_on_cuda_matches_and_has_no_host_sync(name, args):
    lrs = (1e-2, 1e-3)
    batches = [(x.cuda(), y.cuda()) for x, y in _batches(5)]
    results = []
    for fused in (False, True):
        model = _model().cuda()
        opt, _ = O.build_optimizer(name, _groups(model, lrs), lrs[0], O.parse_optimizer_args(args))
        sched = O.build_lr_scheduler("constant_with_warmup", opt, 5, 2)
        fb = FB.FusedBackward(opt, max_grad_norm=0.5) if fused else None
        for i, (x, y) in enumerate(batches):
            if fused and i >= 1:  # after a warm-up step, any host sync is an error
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")
            try:
                nn.functional.mse_loss(model(x), y).backward()
                if not fused:
                    for p in model.parameters():
                        torch.nn.utils.clip_grad_norm_(p, 0.5)
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                sched.step()
            finally:
                torch.cuda.set_sync_debug_mode(0)
        results.append(model)
        assert fb is None or len(fb) == 6
    _assert_same(*results, atol=1e-5)


def test_fused_step_count_ignores_a_parameter_that_never_had_a_gradient():
    """The device step number comes from the states that exist: an unused tensor listed first has none."""
    model = _model()
    unused = nn.Parameter(torch.zeros(4))
    groups = _groups(model, (1e-2, 1e-3))
    groups[0]["params"].insert(0, unused)
    opt, _ = O.build_optimizer("Adafactor", groups, 1e-2, O.parse_optimizer_args(BRIEF_ADAFACTOR_ARGS))
    fb = FB.FusedBackward(opt)
    fb.use_device_scalars(torch.device("cpu"))
    for x, y in _batches(3):
        fb.before_step()
        nn.functional.mse_loss(model(x), y).backward()
        fb.after_step()
    assert opt.steps_taken() == 3 and float(fb.factors[0]["beta2t"]) == pytest.approx(1 - 3 ** -0.8)
    assert not opt.state.get(unused)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("max_norm", [0.01, 100.0])
def test_clip_grad_norm_one_is_torchs_clip_for_one_tensor(dtype, max_norm):
    g = torch.randn(7, 3, generator=torch.Generator().manual_seed(4)).to(dtype)
    p = torch.zeros_like(g, requires_grad=True)
    p.grad = g.clone()
    torch.nn.utils.clip_grad_norm_(p, max_norm)
    ours = g.clone()
    FB.clip_grad_norm_one_(ours, max_norm)
    assert torch.equal(ours, p.grad)
    assert torch.equal(ours, g) is (max_norm == 100.0)  # a norm under the limit leaves the gradient as it was
