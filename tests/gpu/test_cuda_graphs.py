"""On a CUDA GPU: training with CUDA-graphed steps (``--cuda_graphs auto``) equals eager training.

Run on the lent device: ``python -m pytest -m gpu tests/gpu -q`` (never in CI: no GPU there).
Each case trains the tiny model twice from the same seed, eagerly and graphed, through the real
script (in-process), and compares the saved files. The bucketed data has several batch shapes, so
graphs are captured for more than one shape and replayed in mixed order.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import run_main
from tests.integration.test_train_lllite import write_square_task
from tests.integration.test_train_network import train_args
from tests.integration.test_train_textual_inversion import ti_args

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CUDA = ["--mixed_precision", "bf16"]


def train_twice(script: str, make_argv, tmp_path: Path, out_file: str) -> tuple[dict, dict, str]:
    """(eager weights, graphed weights, the graphed run's log)."""
    weights, logs = [], []
    for mode in ("off", "auto"):
        out = tmp_path / f"out_{mode}"
        r = run_main(script, [*make_argv(out), *CUDA, "--cuda_graphs", mode])
        assert r.returncode == 0, r.stderr[-3000:]
        weights.append(load_file(out / out_file))
        logs.append(r.stderr)
    return weights[0], weights[1], logs[1]


def assert_same_training(eager: dict, graphed: dict, log: str, captures: int = 2) -> None:
    assert "CUDA graphs on" in log and log.count("captured a CUDA graph") >= captures, log[-3000:]
    assert "capture failed" not in log, log[-3000:]
    assert eager.keys() == graphed.keys()
    for key, tensor in eager.items():
        a, b = tensor.float(), graphed[key].float()
        rel = float((a - b).norm() / a.norm().clamp(min=1e-12))
        assert rel < 1e-2, (key, rel)


@pytest.mark.parametrize("extra", [(), ("--gradient_checkpointing",), ("--gradient_accumulation_steps", "2"),
                                   ("--fp8_base", "--gradient_checkpointing"),
                                   ("--optimizer_type", "Adafactor", "--optimizer_args", "scale_parameter=False",
                                    "relative_step=False", "warmup_init=False")],
                         ids=["plain", "checkpointing", "accumulation", "fp8_base", "adafactor_step_inside"])
def test_lora_graphed_equals_eager(tiny_ckpt, dataset, tmp_path, extra):
    eager, graphed, log = train_twice(
        "sdxl_train_network.py", lambda out: train_args(tiny_ckpt, dataset, out, 16, *extra)[1:], tmp_path,
        "lora.safetensors")
    assert_same_training(eager, graphed, log)
    assert any(v.abs().sum() > 0 for k, v in graphed.items() if k.endswith("lora_up.weight"))  # it trained


def test_textual_inversion_graphed_equals_eager(tiny_ckpt, dataset, tmp_path):
    eager, graphed, log = train_twice(
        "sdxl_train_textual_inversion.py",
        lambda out: ti_args(tiny_ckpt, dataset, out, 16, "--save_model_as", "safetensors"), tmp_path,
        "sks.safetensors")
    assert_same_training(eager, graphed, log)


def test_lllite_graphed_equals_eager(tiny_ckpt, tmp_path):
    data, cond = write_square_task(tmp_path)

    def argv(out: Path) -> list[str]:
        return ["--pretrained_model_name_or_path", str(tiny_ckpt), "--train_data_dir", str(data),
                "--conditioning_data_dir", str(cond), "--output_dir", str(out), "--output_name", "lllite",
                "--resolution", "64", "--cond_emb_dim", "16", "--network_dim", "32", "--max_train_steps", "12",
                "--learning_rate", "1e-3", "--train_batch_size", "2", "--seed", "1", "--cache_latents",
                "--cache_text_encoder_outputs", "--max_data_loader_n_workers", "0"]

    eager, graphed, log = train_twice("sdxl_train_control_net_lllite.py", argv, tmp_path, "lllite.safetensors")
    assert_same_training(eager, graphed, log, captures=1)


SCALED = ("--optimizer_args", "scale_parameter=True", "relative_step=False", "warmup_init=False")
RELATIVE = ("--optimizer_args", "scale_parameter=True", "relative_step=True", "warmup_init=False",
            "--lr_scheduler", "adafactor")


# The fused backward pass (--fused_backward_pass): test_fused_graphed_equals_eager_with_the_same_device_scalars below.
@pytest.mark.parametrize("extra", [("--full_bf16",), ("--full_bf16", "--gradient_accumulation_steps", "2"), ()],
                         ids=["full_bf16", "accumulation", "fp32_master_autocast"])
def test_full_fine_tune_graphed_equals_eager(tiny_ckpt, dataset, tmp_path, extra):
    """The U-Net's own weights, Adafactor (the brief's recipe): graphed updates equal eager ones.

    Compared as updates (saved minus initial weights): the weights themselves barely move.
    """
    from tests.integration.test_train import ADAFACTOR, base_args

    def argv(out: Path) -> list[str]:
        return [*base_args(tiny_ckpt, dataset, out), *ADAFACTOR, "--learning_rate", "1e-2",
                "--gradient_checkpointing", "--max_train_steps", "12", "--save_model_as", "safetensors",
                "--save_precision", "float", *extra]

    eager, graphed, log = train_twice("sdxl_train.py", argv, tmp_path, "ft.safetensors")
    assert "CUDA graphs on" in log and "captured a CUDA graph" in log and "capture failed" not in log, log[-3000:]
    initial = load_file(tiny_ckpt)
    unet = [k for k in eager if k.startswith("model.diffusion_model.")]
    moved = 0
    for key in unet:
        before = initial[key].to(torch.bfloat16).float() if "--full_bf16" in extra else initial[key].float()
        a, b = eager[key].float() - before, graphed[key].float() - before
        if a.norm() == 0:
            continue
        moved += 1
        rel = float((a - b).norm() / a.norm())
        assert rel < 5e-2, (key, rel)
    assert moved > len(unet) // 2  # it trained


# ---- GraphedLoss on its own: the fallbacks ---------------------------------------------------------------
def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.ModuleDict({"body": torch.nn.Linear(8, 16), "a": torch.nn.Linear(16, 1),
                                "b": torch.nn.Linear(16, 1)}).cuda()


def _loss(net, x: torch.Tensor) -> torch.Tensor:
    h = torch.tanh(net["body"](x))
    out = net["a"](h)
    if x.shape[0] == 4:  # only batches of 4 reach head b
        out = out + net["b"](h)
    return out.square().mean()


def _batches(sizes):
    g = torch.Generator(device="cuda").manual_seed(1)
    return [torch.randn(n, 8, device="cuda", generator=g) for n in sizes]


def test_a_graph_reaching_a_tensor_the_first_batch_did_not_steps_eagerly():
    """Head b first gets a gradient in a captured batch of 4: it has no buffer, so that capture must not be used."""
    from tests.graph_scenarios import two_head_run

    eager, _ = two_head_run("cuda", graphed=False)
    graphed, gl = two_head_run("cuda", graphed=True)
    assert gl.failed and gl.replays >= 1  # the batch-2 graph replayed; the batch-4 capture refused
    for a, b in zip(eager.parameters(), graphed.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_fused_capture_that_fails_part_way_leaves_no_gradient_behind():
    """An error inside one parameter's optimizer step while capturing (an out-of-memory error, say):
    the batch is redone eagerly and every update equals the eager run's."""
    from library.training.adafactor import Adafactor
    from library.training.cuda_graphs import GraphedLoss
    from library.training.fused_backward import FusedBackward

    sizes = [2, 2, 2, 2, 2]
    nets, runs = (_net(), _net()), []
    for net, graphed in zip(nets, (False, True)):
        opt = Adafactor(net.parameters(), lr=1e-2, scale_parameter=False, relative_step=False, warmup_init=False)
        fb = FusedBackward(opt)
        fb.use_device_scalars(torch.device("cuda"))
        if graphed:
            victim = fb.param_optimizers[1]  # the second hook to run raises while capturing
            real_step = victim.step_param

            def step(*args, real_step=real_step, **kwargs):
                if torch.cuda.is_current_stream_capturing():
                    raise torch.cuda.OutOfMemoryError("injected")
                return real_step(*args, **kwargs)
            victim.step_param = step
        gl = GraphedLoss(lambda inputs, net=net: _loss(net, inputs["x"]), lambda loss: loss.backward(),
                         list(net.parameters()), grad_buffers=False, probe=fb.probe)
        for x in _batches(sizes):
            fb.before_step()
            if graphed:
                gl.loss_and_backward({"x": x})
            else:
                _loss(net, x).backward()
            fb.after_step()
        runs.append(gl)
    assert runs[1].failed and not runs[1].graphs
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert b.grad is None


@pytest.mark.parametrize("extra", [(), SCALED, RELATIVE], ids=["brief", "scale_parameter", "relative_step"])
def test_fused_graphed_equals_eager_with_the_same_device_scalars(tiny_ckpt, dataset, tmp_path, monkeypatch, extra):
    """Tells arithmetic drift from a fault in the graphed fused pass: three runs of the real script,
    ``--cuda_graphs off`` (host numbers), ``auto`` with no graph ever captured (eager steps reading the
    step's factors from the device tensors the graphs read) and ``auto`` graphed. Graphed must equal the
    second run. The spread between the first two is printed (run with -s): the drift a graph cannot be
    blamed for. It was large when the factors were computed in fp32 on the device (H100, 2026-12-07);
    since they are the host's fp64 numbers written into the tensors it is 0 on the CPU, and on a GPU as
    far as CUDA's ``addcmul_`` rounds as ``add_(alpha=)`` does."""
    from library.training import cuda_graphs
    from tests.integration.test_train import ADAFACTOR, base_args

    weights = {}
    for name, flag, max_graphs in (("off", "off", None), ("scalars", "auto", 0), ("graphed", "auto", None)):
        out = tmp_path / name
        with monkeypatch.context() as m:
            if max_graphs is not None:
                m.setattr(cuda_graphs, "MAX_GRAPHS", max_graphs)
            r = run_main("sdxl_train.py", [*base_args(tiny_ckpt, dataset, out), *ADAFACTOR, "--learning_rate", "1e-2",
                                           "--gradient_checkpointing", "--max_train_steps", "12", "--save_model_as",
                                           "safetensors", "--save_precision", "float", "--full_bf16",
                                           "--fused_backward_pass", *CUDA, "--cuda_graphs", flag, *extra])
        assert r.returncode == 0, r.stderr[-3000:]
        if name == "graphed":
            assert "captured a CUDA graph" in r.stderr and "capture failed" not in r.stderr, r.stderr[-3000:]
        weights[name] = load_file(out / "ft.safetensors")
    initial = load_file(tiny_ckpt)

    def spreads(x: str, y: str) -> list[tuple[float, str]]:
        rows = []
        for key in weights[x]:
            if not key.startswith("model.diffusion_model."):
                continue
            before = initial[key].to(torch.bfloat16).float()
            a, b = weights[x][key].float() - before, weights[y][key].float() - before
            if a.norm() > 0:
                rows.append((float((a - b).norm() / a.norm()), key))
        return sorted(rows, reverse=True)

    drift, fault = spreads("off", "scalars"), spreads("scalars", "graphed")
    print(f"\n[fused {extra or 'brief'}] off vs device scalars: worst {drift[:3]}, median {drift[len(drift) // 2][0]:.2e}")
    print(f"[fused {extra or 'brief'}] device scalars vs graphed: worst {fault[:3]}, median {fault[len(fault) // 2][0]:.2e}")
    assert len(fault) > 10 and fault[0][0] < 1e-2, fault[:5]
