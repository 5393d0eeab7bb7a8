"""When generation may replay its U-Net calls as CUDA graphs (the replays themselves: tests/gpu)."""

from __future__ import annotations

import types

import torch

from library.inference import gen_features as gf
from library.inference.control import LLLiteControl
from library.inference.gen_args import parse_args
from library.inference.pipeline import DenoiseStep
from library.inference.unet_graphs import hooks_key


class _Net:
    def __init__(self):
        self.enabled = None

    def set_multiplier(self, value):
        pass

    def set_enabled(self, enabled):
        self.enabled = enabled


def test_lllite_hook_key_follows_the_ratio_switch():
    nets = [_Net(), _Net()]
    control = LLLiteControl(nets, [1.0, 1.0], [0.5, 1.0])
    keys = []
    for i in range(4):
        control(DenoiseStep(i, 4, torch.tensor(500), torch.zeros(2, 4, 8, 8), 1, 2))
        keys.append(hooks_key([control]))
    assert keys[0] == keys[1] != keys[2] == keys[3]  # the first network goes off after half the calls
    assert [n.enabled for n in nets] == [False, True]


def test_a_hook_without_a_graph_key_keeps_the_loop_eager():
    assert hooks_key([]) == ()
    assert hooks_key([lambda step: None]) is None


def test_script_switch(tmp_path):
    gen = types.SimpleNamespace(device=torch.device("cuda"), cuda_graphs=False)
    gf.set_cuda_graphs(gen, parse_args(["--ckpt", "m.safetensors", "--prompt", "a cat"]))
    assert gen.cuda_graphs
    gf.set_cuda_graphs(gen, parse_args(["--ckpt", "m.safetensors", "--prompt", "a cat", "--cuda_graphs", "off"]))
    assert not gen.cuda_graphs
    gf.set_cuda_graphs(gen, parse_args(["--ckpt", "m.safetensors", "--prompt", "a cat --ds 3"]))
    assert not gen.cuda_graphs  # Deep Shrink in a prompt
    gen.device = torch.device("cpu")
    gf.set_cuda_graphs(gen, parse_args(["--ckpt", "m.safetensors", "--prompt", "a cat"]))
    assert not gen.cuda_graphs
