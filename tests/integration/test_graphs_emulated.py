"""The trainers with ``--cuda_graphs auto`` on the CPU, through the graph emulation (tests/graph_emulator.py).

The same runs as tests/gpu/test_cuda_graphs.py, in CI: each case trains the tiny model twice in this
process, eagerly and with graphs (two bucket shapes, replayed in mixed order), and compares the saved
files. What this checks is the trainers' side of the graphs (which batches are captured, the gradient
buffers, gradient accumulation, the fused optimizer's device scalars before and after each step, text
encoders inside and outside the graph); what only a GPU shows is left to the GPU tests.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests import graph_emulator
from tests.conftest import run_main
from tests.integration.test_train_network import train_args
from tests.integration.test_train_textual_inversion import ti_args

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def emulated(monkeypatch):
    """Graphs on a CPU: the emulation, and the device check answered as on a GPU."""
    graph_emulator.install(monkeypatch)
    graph_emulator.answer_as_gpu(monkeypatch)


def train_twice(script: str, make_argv, tmp_path: Path, out_file: str) -> tuple[dict, dict, str]:
    """(weights of ``--cuda_graphs off``, weights of ``--cuda_graphs auto`` graphed under the emulation,
    the graphed run's log)."""
    weights, log = [], ""
    for flag in ("off", "auto"):
        out = tmp_path / f"out_{flag}"
        r = run_main(script, [*make_argv(out), "--cuda_graphs", flag])
        assert r.returncode == 0, r.stderr[-3000:]
        if flag == "auto":
            assert "CUDA graphs on" in r.stderr and r.stderr.count("captured a CUDA graph") >= 2, r.stderr[-3000:]
            assert "capture failed" not in r.stderr and "changed no" not in r.stderr, r.stderr[-3000:]
            log = r.stderr
        weights.append(load_file(out / out_file))
    return weights[0], weights[1], log


def assert_same(eager: dict, graphed: dict, tol: float = 1e-5) -> None:
    assert eager.keys() == graphed.keys()
    for key, tensor in eager.items():
        a, b = tensor.float(), graphed[key].float()
        assert float((a - b).abs().max()) <= tol * max(float(a.abs().max()), 1e-6), key


def test_lora_with_checkpointing_and_accumulation(tiny_ckpt, dataset, tmp_path, monkeypatch):
    eager, graphed, log = train_twice(
        "sdxl_train_network.py",
        lambda out: train_args(tiny_ckpt, dataset, out, 8, "--gradient_checkpointing",
                               "--gradient_accumulation_steps", "2")[1:], tmp_path, "lora.safetensors")
    assert_same(eager, graphed)
    assert any(v.abs().sum() > 0 for k, v in graphed.items() if k.endswith("lora_up.weight"))  # it trained


def test_textual_inversion_encoders_inside_the_graph(tiny_ckpt, dataset, tmp_path, monkeypatch):
    eager, graphed, log = train_twice(
        "sdxl_train_textual_inversion.py",
        lambda out: ti_args(tiny_ckpt, dataset, out, 8, "--save_model_as", "safetensors"), tmp_path,
        "sks.safetensors")
    assert_same(eager, graphed)


def test_full_fine_tune_with_the_optimizer_inside_the_graph(tiny_ckpt, dataset, tmp_path, monkeypatch):
    """Fused Adafactor (the brief's full fine-tune): the optimizer steps replay with the backward
    (checkpointing and accumulation in the graphs are the LoRA case's; the buffers are the same code)."""
    from tests.integration.test_train import ADAFACTOR, base_args

    def argv(out: Path) -> list[str]:
        return [*base_args(tiny_ckpt, dataset, out), *ADAFACTOR, "--learning_rate", "1e-2", "--max_train_steps", "8",
                "--save_model_as", "safetensors", "--save_precision", "float", "--train_batch_size", "2",
                "--fused_backward_pass"]

    eager, graphed, log = train_twice("sdxl_train.py", argv, tmp_path, "ft.safetensors")
    initial = load_file(tiny_ckpt)
    unet = [k for k in eager if k.startswith("model.diffusion_model.")]
    moved = 0
    for key in unet:  # compared as updates: the weights themselves barely move
        a, b = eager[key].float() - initial[key].float(), graphed[key].float() - initial[key].float()
        if a.norm() == 0:
            continue
        moved += 1
        assert torch.equal(a, b), key  # the fused Adafactor reads the host's own factors from device tensors
    assert moved > len(unet) // 2


STEP_IN_GRAPH = "the optimizer step replays inside the graph"


def test_lora_with_adafactor_steps_inside_the_graph(tiny_ckpt, dataset, tmp_path):
    """No accumulation, nothing trained outside the U-Net: clipping and the Adafactor step replay too."""
    eager, graphed, log = train_twice(
        "sdxl_train_network.py",
        lambda out: train_args(tiny_ckpt, dataset, out, 8, "--optimizer_type", "Adafactor", "--optimizer_args",
                               "scale_parameter=False", "relative_step=False", "warmup_init=False",
                               "--max_grad_norm", "0.01")[1:], tmp_path, "lora.safetensors")
    assert STEP_IN_GRAPH in log
    assert all(torch.equal(eager[k], graphed[k]) for k in eager)
    assert any(v.abs().sum() > 0 for k, v in graphed.items() if k.endswith("lora_up.weight"))  # it trained


def test_full_fine_tune_steps_inside_the_graph(tiny_ckpt, dataset, tmp_path):
    """The brief's recipe without the fused pass: the whole optimizer step replays, no gradient buffers."""
    from tests.integration.test_train import ADAFACTOR, base_args

    def argv(out: Path) -> list[str]:
        return [*base_args(tiny_ckpt, dataset, out), *ADAFACTOR, "--learning_rate", "1e-2", "--max_train_steps", "8",
                "--save_model_as", "safetensors", "--save_precision", "float", "--train_batch_size", "2"]

    eager, graphed, log = train_twice("sdxl_train.py", argv, tmp_path, "ft.safetensors")
    assert STEP_IN_GRAPH in log
    initial = load_file(tiny_ckpt)
    moved = [k for k in eager if k.startswith("model.diffusion_model.") and not torch.equal(eager[k], initial[k])]
    assert len(moved) > 10 and all(torch.equal(eager[k], graphed[k]) for k in eager)
