"""Which training runs replay their steps as CUDA graphs (library.training.cuda_graphs.graph_blocker).

The graphs themselves need a GPU (tests/gpu/test_cuda_graphs.py); what is decided before them is
host logic and is checked here.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from library.training import fused_backward as FB
from library.training import optim as O
from library.training.cuda_graphs import graph_blocker

ADAFACTOR = O.parse_optimizer_args(["scale_parameter=False", "relative_step=False", "warmup_init=False"])


def cfg(**changes):
    base = dict(cuda_graphs="auto", mixed_precision="bf16", fused_backward_pass=False, fused_optimizer_groups=None,
                cpu_offload_checkpointing=False, deepspeed=False, gradient_checkpointing=True,
                gradient_accumulation_steps=1)
    return SimpleNamespace(**{**base, **changes})


CUDA = SimpleNamespace(device=torch.device("cuda"), num_processes=1)
FULL_FT = SimpleNamespace(unet_weights_trained=True, forwards_through_prepared=True)  # DDP wraps its models
ADAPTER = SimpleNamespace(unet_weights_trained=False)  # patched into the frozen U-Net; the loop averages


def fused(optimizer_type: str, args: dict) -> FB.FusedBackward:
    model = nn.Linear(4, 4)
    opt, _ = O.build_optimizer(optimizer_type, [{"params": list(model.parameters()), "lr": 1e-3}], 1e-3, dict(args))
    return FB.FusedBackward(opt)


def test_full_fine_tuning_is_graphed_with_or_without_accumulation():
    assert graph_blocker(cfg(), CUDA, FULL_FT) is None
    assert graph_blocker(cfg(gradient_accumulation_steps=4), CUDA, FULL_FT) is None


def test_fused_backward_is_graphed_with_adafactor_only():
    on = cfg(fused_backward_pass=True)
    assert graph_blocker(on, CUDA, FULL_FT, fused("Adafactor", ADAFACTOR)) is None
    assert "Adafactor only" in graph_blocker(on, CUDA, FULL_FT, fused("AdamW", {}))
    assert "inside the backward" in graph_blocker(on, CUDA, FULL_FT, None)
    groups = cfg(fused_optimizer_groups=4)
    assert "--fused_optimizer_groups" in graph_blocker(groups, CUDA, FULL_FT, fused("Adafactor", ADAFACTOR))


def test_what_always_stays_eager():
    cpu = SimpleNamespace(device=torch.device("cpu"), num_processes=1)
    two = SimpleNamespace(device=torch.device("cuda"), num_processes=2)
    assert graph_blocker(cfg(), cpu, FULL_FT) == "not on a CUDA device"
    assert "several processes with wrapped models" in graph_blocker(cfg(), two, FULL_FT)
    assert graph_blocker(cfg(cuda_graphs="off"), CUDA, FULL_FT) == "--cuda_graphs off"
    assert "fp16" in graph_blocker(cfg(mixed_precision="fp16"), CUDA, FULL_FT)
    assert "DeepSpeed" in graph_blocker(cfg(deepspeed=True), CUDA, FULL_FT)


def test_adapters_on_several_processes_are_graphed_unless_averaged_inside_the_backward():
    """Adapter gradients are averaged after the replay (the loop's GradientAverager): graphed as on one
    GPU. DDP's hooks and the fused pass's per-gradient averaging run inside the backward: eager."""
    two = SimpleNamespace(device=torch.device("cuda"), num_processes=2)
    assert graph_blocker(cfg(), two, ADAPTER) is None
    assert graph_blocker(cfg(gradient_accumulation_steps=2), two, ADAPTER) is None
    averaging = FB.FusedBackward(fused("Adafactor", ADAFACTOR).optimizer, grad_reduce=lambda p: None)
    on = cfg(fused_backward_pass=True)
    assert "averages gradients across processes" in graph_blocker(on, two, FULL_FT, averaging)
