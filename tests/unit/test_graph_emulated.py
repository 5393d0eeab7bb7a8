"""GraphedLoss on the CPU through the graph emulation (tests/graph_emulator.py): graphed training equals eager.

The real thing runs on a GPU (tests/gpu/test_cuda_graphs.py); this checks in CI what does not need one:
that nothing a step changes is baked into a graph as a host value (learning rates, step numbers,
Adafactor's factors), that gradients accumulate into the buffers across batch shapes and accumulation
windows, and the fallbacks (a capture failing part-way, a graph reaching a tensor without a buffer).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from library.training import fused_backward as FB
from library.training import optim as O
from library.training.cuda_graphs import GraphedLoss
from tests import graph_emulator
from tests.graph_scenarios import two_head_adafactor_run, two_head_run

BRIEF = O.parse_optimizer_args(["scale_parameter=False", "relative_step=False", "warmup_init=False"])
SCALED = O.parse_optimizer_args(["scale_parameter=True", "relative_step=False", "beta1=0.9", "weight_decay=0.1"])
SIZES = [8, 8, 4, 8, 4, 4, 8, 4, 8, 8, 4, 4]  # two batch shapes, in mixed order: two graphs


@pytest.fixture(autouse=True)
def emulated(monkeypatch):
    graph_emulator.install(monkeypatch)


def _model() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))


def _batches(sizes):
    gen = torch.Generator().manual_seed(2)
    return [(torch.randn(n, 6, generator=gen), torch.randn(n, 3, generator=gen)) for n in sizes]


def _train(graphed: bool, optimizer: str, args: dict, fused: bool, accumulation: int = 1, clip=None,
           scheduler: str = "linear", device_scalars: bool = True):
    """Train on SIZES the way Trainer.step does; returns (model, GraphedLoss or None)."""
    model = _model()
    groups = [{"params": list(model[0].parameters()) + list(model[2].parameters()), "lr": 1e-2},
              {"params": list(model[4].parameters()), "lr": 1e-3}]
    opt, _ = O.build_optimizer(optimizer, groups, 1e-2, dict(args))
    steps = len(SIZES) // accumulation
    sched = O.build_lr_scheduler(scheduler, opt, steps, 0 if scheduler == "adafactor" else 2)
    fb = FB.fused_backward_step(opt, max_grad_norm=clip) if fused else None
    params = [p for g in opt.param_groups for p in g["params"]]
    gl = None
    if graphed:
        if fb is not None and device_scalars:
            fb.use_device_scalars(torch.device("cpu"))
        gl = GraphedLoss(lambda b: nn.functional.mse_loss(model(b["x"]), b["y"]),
                         lambda loss: (loss / accumulation).backward(), params, grad_buffers=fb is None,
                         probe=fb.probe if fb is not None else None)
    batches = iter(_batches(SIZES))
    for _ in range(steps):
        for _ in range(accumulation):
            x, y = next(batches)
            if fb is not None:
                fb.before_step()
            if gl is not None:
                gl.loss_and_backward({"x": x, "y": y})
            else:
                (nn.functional.mse_loss(model(x), y) / accumulation).backward()
            if fb is not None:
                fb.after_step()
        if fb is None:
            if clip:
                torch.nn.utils.clip_grad_norm_(params, clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
        sched.step()
    return model, gl


@torch.no_grad()
def _largest_difference(a: nn.Module, b: nn.Module) -> float:
    return max(float((p - q).abs().max() / p.abs().max()) for p, q in zip(a.parameters(), b.parameters()))


CASES = {
    "buffers AdamW": dict(optimizer="AdamW", args={}, fused=False),
    "buffers AdamW, accumulation 3, clipping": dict(optimizer="AdamW", args={}, fused=False, accumulation=3, clip=0.1),
    "buffers Adafactor, accumulation 2": dict(optimizer="Adafactor", args=BRIEF, fused=False, accumulation=2),
    "fused Adafactor (the brief's)": dict(optimizer="Adafactor", args=BRIEF, fused=True),
    "fused Adafactor, clipping": dict(optimizer="Adafactor", args=BRIEF, fused=True, clip=0.05),
    "fused Adafactor, scaling, beta1, decay": dict(optimizer="Adafactor", args=SCALED, fused=True),
    "fused Adafactor, relative step": dict(optimizer="Adafactor", args={}, fused=True, scheduler="adafactor"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_graphed_training_equals_eager(case):
    kwargs = CASES[case]
    eager, _ = _train(False, **kwargs)
    graphed, gl = _train(True, **kwargs)
    assert not gl.failed and len(gl.graphs) == 2 and gl.replays >= len(SIZES) // 2
    # the fused Adafactor reads the host's factors from device tensors: the same update, bit for bit
    # (weight decay: one multiply-add instead of add(alpha=), a rounding apart)
    if kwargs["args"].get("weight_decay"):
        assert _largest_difference(eager, graphed) < 1e-5
    elif kwargs["fused"]:
        assert _largest_difference(eager, graphed) == 0.0
    else:
        assert _largest_difference(eager, graphed) < 1e-6


def test_the_emulation_sees_host_numbers_baked_into_a_graph():
    """The control: a fused optimizer reading its lr and step from host numbers trains differently when replayed."""
    eager, _ = _train(False, "Adafactor", BRIEF, fused=True)
    baked, gl = _train(True, "Adafactor", BRIEF, fused=True, device_scalars=False)
    assert gl.replays > 0 and _largest_difference(eager, baked) > 1e-3


def test_a_capture_failing_part_way_leaves_no_gradient_behind(monkeypatch):
    """One parameter's optimizer step raises while capturing (as an out-of-memory error would): the run
    goes on eagerly and equals the eager run (a gradient left from the capture would be added to the redo)."""
    real = FB.FusedBackward.__init__

    def init(self, *args, **kwargs):
        real(self, *args, **kwargs)
        victim = self.param_optimizers[2]
        step = victim.step_param

        def failing(*a, **k):
            if torch.cuda.is_current_stream_capturing():
                raise RuntimeError("CUDA out of memory (injected)")
            return step(*a, **k)
        victim.step_param = failing
    monkeypatch.setattr(FB.FusedBackward, "__init__", init)
    eager, _ = _train(False, "Adafactor", BRIEF, fused=True)
    graphed, gl = _train(True, "Adafactor", BRIEF, fused=True)
    assert gl.failed and not gl.graphs
    assert _largest_difference(eager, graphed) < 1e-5
    assert all(p.grad is None for p in graphed.parameters())


@pytest.mark.parametrize("accumulation", [1, 3])
def test_a_failed_capture_gives_the_gradient_buffers_back(monkeypatch, accumulation):
    """An out-of-memory error while capturing (a card near its limit): the eager steps that follow hold
    no gradient buffer (they would keep a whole model's gradients alive through every forward), and
    train as the eager run does, also when the capture came in the middle of an accumulation window."""
    real = nn.functional.mse_loss

    def loss(*args, **kwargs):
        if torch.cuda.is_current_stream_capturing():
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real(*args, **kwargs)
    monkeypatch.setattr(nn.functional, "mse_loss", loss)
    kwargs = dict(optimizer="AdamW", args={}, fused=False, accumulation=accumulation)
    eager, _ = _train(False, **kwargs)
    graphed, gl = _train(True, **kwargs)
    assert gl.failed and not gl.graphs and gl.buffers is None and gl.pool is None
    assert all(p.grad is None for p in graphed.parameters())
    assert _largest_difference(eager, graphed) < 1e-6


@pytest.mark.parametrize("spare_mib, graphed", [(100, False), (400, True)])
def test_no_capture_when_the_eager_steps_leave_too_little_memory(monkeypatch, spare_mib, graphed):
    """Under the base headroom (a tiny model's buffers add nothing) the run steps eagerly, with no buffers."""
    from library.training import cuda_graphs

    monkeypatch.setattr(cuda_graphs, "memory_use", lambda device: (6 << 30, (6 << 30) + (spare_mib << 20)))
    kwargs = dict(optimizer="AdamW", args={}, fused=False)
    eager, _ = _train(False, **kwargs)
    run, gl = _train(True, **kwargs)
    assert bool(gl.graphs) is graphed and gl.failed is not graphed
    assert (gl.buffers is None) is not graphed
    assert _largest_difference(eager, run) < 1e-6


def test_the_headroom_grows_with_the_gradient_buffers():
    """Fitted to the full fine-tune on an H100: 4.8 GiB of buffers and 0.82 GiB left was too little;
    a LoRA (0.2 GiB of buffers) and the fused pass (none) need far less."""
    from library.training.cuda_graphs import headroom_needed

    gib = 2**30
    assert 0.82 * gib < headroom_needed(int(4.78 * gib)) < 1.1 * gib
    assert headroom_needed(0) < headroom_needed(int(0.2 * gib)) < 0.3 * gib


def test_an_optimizer_step_creating_state_while_capturing_is_not_used():
    """The step inside the graph: head b's first gradient comes in a captured batch; its new optimizer
    state would be graph memory, so that capture is refused and the run equals the eager one bit for bit."""
    eager, _ = two_head_adafactor_run("cpu", graphed=False)
    graphed, gl = two_head_adafactor_run("cpu", graphed=True)
    assert gl.failed and not gl.graphs and not gl.grad_buffers and gl.buffers is None
    assert _largest_difference(eager, graphed) == 0.0


def test_step_inside_only_before_the_first_batch():
    gl = GraphedLoss(lambda b: b["x"].sum(), lambda loss: None, [])
    gl.seen.add(("x",))
    with pytest.raises(RuntimeError, match="first batch"):
        gl.step_inside(lambda loss: None, lambda: torch.zeros(()), dict)


def test_a_graph_reaching_a_tensor_without_a_buffer_is_not_used():
    """Head b gets its first gradient in a batch that is captured: its replays would drop that gradient."""
    eager, _ = two_head_run("cpu", graphed=False)
    graphed, gl = two_head_run("cpu", graphed=True)
    assert gl.failed and gl.replays >= 1  # the batch-2 graph replays; the batch-4 capture was refused
    assert _largest_difference(eager, graphed) < 1e-6


@pytest.mark.parametrize("fraction, free_gib, expected_gib", [(12 / 80, 70.0, 12.0), (1.0, 2.0, 5.0)])
def test_memory_use_reads_the_per_process_cap_and_what_is_free(monkeypatch, fraction, free_gib, expected_gib):
    """The limit is the capped share of the card (an emulated 12 GiB card), or what is free plus what
    this process holds, whichever is smaller (another process using the card)."""
    from types import SimpleNamespace

    from library.training import cuda_graphs

    gib = 2**30
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(total_memory=80 * gib))
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda d: fraction)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: (int(free_gib * gib), 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d: 3 * gib)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d: 2 * gib)
    assert cuda_graphs.memory_use(torch.device("cuda", 0)) == (2 * gib, int(expected_gib * gib))
    assert cuda_graphs.memory_use(torch.device("cpu")) is None
