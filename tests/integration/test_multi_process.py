"""Trainers under ``accelerate launch --multi_gpu --num_processes 2`` on the CPU (gloo), against one process.

Six two-process launches in all (each costs two interpreter starts and two model loads):
LoRA straight, LoRA resumed, LoRA with graphed steps (the CPU graph emulation), full fine-tune,
textual inversion, ControlNet-LLLite. ``SDXL_TRAINER_WEIGHT_HASH_DIR`` makes each process
write the hash of its trained weights after every optimizer step, so "identical on both processes
after every step" is checked step by step, not only at the end.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import shutil
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.conftest import run_main, run_script

pytestmark = pytest.mark.slow

DATA = ["--resolution", "64", "--enable_bucket", "--min_bucket_reso", "32", "--max_bucket_reso", "128",
        "--bucket_reso_steps", "32", "--max_data_loader_n_workers", "0", "--seed", "1", "--train_batch_size", "2",
        "--log_every_n_steps", "1"]


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two(script: str, args: list[str], hash_dir: Path, monkeypatch, graphs: bool = False):
    """``accelerate launch --multi_gpu --num_processes 2`` (gloo on the CPU), hashes into ``hash_dir``;
    ``graphs``: the steps replayed by the CPU graph emulation (tests/graphs_on_cpu.py)."""
    monkeypatch.setenv("SDXL_TRAINER_WEIGHT_HASH_DIR", str(hash_dir))
    wrapper = ["tests/graphs_on_cpu.py"] if graphs else []
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), *wrapper, script, *args]
    r = run_script(cmd, timeout=600)
    monkeypatch.delenv("SDXL_TRAINER_WEIGHT_HASH_DIR")
    assert r.returncode == 0, r.stderr[-4000:]
    return r


def run_one(script: str, args: list[str]):
    """The one-process reference run, in this process (each script's real launch is elsewhere)."""
    r = run_main(script, args)
    assert r.returncode == 0, r.stderr[-4000:]
    return r


def step_hashes(hash_dir: Path) -> list[list[str]]:
    """Per process, the ``"<step> <hash>"`` lines it wrote."""
    return [(hash_dir / f"rank{i}.txt").read_text().split("\n")[:-1] for i in range(2)]


def metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def copy_data(tiny_model_dir: Path, dst: Path) -> Path:
    shutil.copytree(tiny_model_dir / "train", dst)
    return dst


def lora_args(ckpt: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["--pretrained_model_name_or_path", str(ckpt), "--train_data_dir", str(data), *DATA,
            "--output_dir", str(out), "--output_name", "lora", "--network_module", "networks.lora",
            "--network_dim", "4", "--network_alpha", "4", "--network_train_unet_only",
            "--cache_latents_to_disk", "--cache_text_encoder_outputs_to_disk", "--learning_rate", "1e-3",
            "--max_train_steps", "4", "--lr_scheduler", "linear", *extra]


def test_lora_two_processes_equal_one_process_and_resume_exactly(tiny_ckpt, tiny_model_dir, tmp_path, monkeypatch):
    data1, data2 = copy_data(tiny_model_dir, tmp_path / "d1"), copy_data(tiny_model_dir, tmp_path / "d2")
    out1, out2, out3 = tmp_path / "one", tmp_path / "two", tmp_path / "resumed"
    # Two processes x batch 2 = global batch 4. The schedule is max_train_steps x 2 scheduler steps long
    # and advances twice per optimizer step (sd-scripts' rule): --lr_warmup_steps 2 is one optimizer step.
    r = launch_two("sdxl_train_network.py", lora_args(tiny_ckpt, data2, out2, "--lr_warmup_steps", "2",
                                                      "--save_every_n_steps", "2", "--save_state"),
                   tmp_path / "h2", monkeypatch)
    run_one("sdxl_train_network.py", lora_args(tiny_ckpt, data1, out1, "--lr_warmup_steps", "1",
                                               "--gradient_accumulation_steps", "2"))

    # the processes agree after every step
    rank0, rank1 = step_hashes(tmp_path / "h2")
    assert rank0 == rank1 and [line.split()[0] for line in rank0] == ["1", "2", "3", "4"]
    assert len({line.split()[1] for line in rank0}) == 4  # the weights moved (warm-up: lr 0 at step 1)
    # each process cached its own half: 8 images, 4 + 4 latents and text-encoder outputs
    logs = r.stdout + r.stderr
    for what in ("latents", "text-encoder outputs"):
        counts = sorted(re.findall(rf"{what}: (\d+) computed, (\d+) reused \(process (\d) of 2\)", logs))
        assert [(c, p) for c, _, p in counts] == [("4", "1"), ("4", "2")], counts
    # one process wrote the outputs
    assert re.findall(r"^saved (.*)$", r.stdout, flags=re.MULTILINE) == [str(out2 / "lora.safetensors")]
    assert sorted(p.name for p in out2.iterdir()) == ["lora-state", "lora-step00000002-state",
                                                      "lora-step00000002.safetensors", "lora.safetensors"]
    state_dir = out2 / "lora-step00000002-state"
    assert {"random_states_0.pkl", "random_states_1.pkl", "train_state.json"} <= {p.name for p in state_dir.iterdir()}

    # the same weights as one process with --gradient_accumulation_steps 2 over the same batches
    a, b = load_file(out1 / "lora.safetensors"), load_file(out2 / "lora.safetensors")
    assert a.keys() == b.keys()
    assert max(v.abs().max().item() for k, v in a.items() if "lora_up" in k) > 1e-3  # trained (lora_up starts at 0)
    for k in a:  # float tolerance: the TE cache batches differ (8 captions vs 4 per process)
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=2e-5, msg=k)
    m1, m2 = metadata(out1 / "lora.safetensors"), metadata(out2 / "lora.safetensors")
    assert (m2["ss_batch_size_per_device"], m2["ss_total_batch_size"]) == ("2", "4")
    assert (m1["ss_batch_size_per_device"], m1["ss_total_batch_size"]) == ("2", "4")
    assert int(m1["ss_num_batches_per_epoch"]) == 2 * int(m2["ss_num_batches_per_epoch"])  # per process

    # the two-process caches equal the one-process caches (latents bit for bit: noise seeded per image)
    files1 = sorted(p.relative_to(data1) for p in data1.rglob("*.npz"))
    assert files1 == sorted(p.relative_to(data2) for p in data2.rglob("*.npz")) and len(files1) == 16
    for rel in files1:
        with np.load(data1 / rel) as x, np.load(data2 / rel) as y:
            assert x.files == y.files
            for key in x.files:
                if rel.name.endswith("_sdxl.npz"):
                    assert np.array_equal(x[key], y[key]), (rel, key)
                elif x[key].dtype.kind == "f":
                    np.testing.assert_allclose(x[key], y[key], rtol=0, atol=1e-5, err_msg=f"{rel} {key}")
                else:  # the provenance record holds digests of those (float-close) arrays
                    px, py = json.loads(str(x[key])), json.loads(str(y[key]))
                    assert {**px, "digests": None} == {**py, "digests": None}, rel

    # resume with two processes from the step-2 state: the same steps 3 and 4, bit for bit
    launch_two("sdxl_train_network.py", lora_args(tiny_ckpt, data2, out3, "--lr_warmup_steps", "2",
                                                  "--resume", str(state_dir)), tmp_path / "h3", monkeypatch)
    r0, r1 = step_hashes(tmp_path / "h3")
    assert r0 == r1 == rank0[2:]
    c = load_file(out3 / "lora.safetensors")
    assert all(torch.equal(b[k], c[k]) for k in b)
    assert metadata(out3 / "lora.safetensors")["ss_steps"] == "4"


def test_lora_steps_graphed_on_two_processes_equal_eager_ones(tiny_ckpt, tiny_model_dir, tmp_path, monkeypatch):
    """With several processes an adapter's steps are CUDA graphs as on one GPU: each process replays its
    forward and backward, and the loop averages the gradient buffers after the replay (the CPU emulation
    stands in for the GPU's graphs). Every step's weights equal the eager two-process run's bit for bit
    (which equals one process, above)."""
    args = ["--max_train_steps", "6", "--gradient_checkpointing"]
    weights, hashes = {}, {}
    for graphs in (False, True):
        data = copy_data(tiny_model_dir, tmp_path / f"d{graphs}")
        out, hash_dir = tmp_path / f"out{graphs}", tmp_path / f"h{graphs}"
        r = launch_two("sdxl_train_network.py", lora_args(tiny_ckpt, data, out, *args), hash_dir, monkeypatch,
                       graphs=graphs)
        weights[graphs], hashes[graphs] = load_file(out / "lora.safetensors"), step_hashes(hash_dir)
    assert r.stderr.count("CUDA graphs on") == 2, r.stderr[-4000:]  # in each process
    # the data has two bucket shapes, so a process captures at most two graphs: three or more is both processes
    assert r.stderr.count("captured a CUDA graph") >= 3 and "capture failed" not in r.stderr, r.stderr[-4000:]
    assert hashes[True][0] == hashes[True][1] == hashes[False][0] and len(hashes[True][0]) == 6
    assert weights[True].keys() == weights[False].keys()
    assert all(torch.equal(weights[True][k], weights[False][k]) for k in weights[False])


def assert_one_checkpoint_equal(r, out1: Path, out2: Path, base_ckpt: Path, atol: float) -> None:
    """The two-process run (``r``, into ``out2``) wrote one checkpoint, trained every part, and equals the
    one-process checkpoint in ``out1`` within ``atol``."""
    assert re.findall(r"^saved (.*)$", r.stdout, flags=re.MULTILINE) == [str(out2 / "ft.safetensors")]
    assert [p.name for p in out2.iterdir()] == ["ft.safetensors"]
    a, b, base = load_file(out1 / "ft.safetensors"), load_file(out2 / "ft.safetensors"), load_file(base_ckpt)
    assert a.keys() == b.keys() == base.keys()
    for prefix in ("model.diffusion_model.", "conditioner.embedders.0.", "conditioner.embedders.1."):
        keys = [k for k in a if k.startswith(prefix)]
        assert any(not torch.equal(b[k], base[k]) for k in keys), prefix  # trained
        for k in keys:
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=atol, msg=k)


def test_full_finetune_two_processes_equal_one_process(tiny_ckpt, tiny_model_dir, tmp_path, monkeypatch):
    """sdxl_train.py: the U-Net and both text encoders under DDP, against one process accumulating 2 batches."""
    data = copy_data(tiny_model_dir, tmp_path / "d")
    args = ["--pretrained_model_name_or_path", str(tiny_ckpt), "--train_data_dir", str(data), *DATA,
            "--output_name", "ft", "--max_train_steps", "3", "--learning_rate", "1e-4", "--train_text_encoder",
            "--learning_rate_te1", "1e-5", "--learning_rate_te2", "1e-5", "--optimizer_type", "AdamW"]
    out1, out2 = tmp_path / "one", tmp_path / "two"
    r = launch_two("sdxl_train.py", [*args, "--output_dir", str(out2)], tmp_path / "h", monkeypatch)
    run_one("sdxl_train.py", [*args, "--output_dir", str(out1), "--gradient_accumulation_steps", "2"])
    assert "training on 2 process(es), MULTI_CPU (DDP)" in r.stderr
    rank0, rank1 = step_hashes(tmp_path / "h")
    assert rank0 == rank1 and len(rank0) == 3 and len({line.split()[1] for line in rank0}) == 3
    assert_one_checkpoint_equal(r, out1, out2, tiny_ckpt, atol=1e-7)
    meta = metadata(out2 / "ft.safetensors")
    assert (meta["ss_batch_size_per_device"], meta["ss_total_batch_size"]) == ("2", "4")


def test_textual_inversion_two_processes_equal_one_process(tiny_ckpt, tiny_model_dir, tmp_path, monkeypatch):
    """The token vectors (unwrapped, averaged by the loop) in template mode: templates follow the batch,
    not the process, so two processes train what one process accumulating the same batches trains."""
    data = copy_data(tiny_model_dir, tmp_path / "d")
    args = ["--pretrained_model_name_or_path", str(tiny_ckpt), "--train_data_dir", str(data), *DATA,
            "--output_name", "sks", "--token_string", "sks", "--init_word", "circle", "--num_vectors_per_token", "2",
            "--use_object_template", "--learning_rate", "5e-3", "--max_train_steps", "3", "--cache_latents",
            "--save_model_as", "safetensors"]
    out1, out2 = tmp_path / "one", tmp_path / "two"
    r = launch_two("sdxl_train_textual_inversion.py", [*args, "--output_dir", str(out2)], tmp_path / "h",
                   monkeypatch)
    run_one("sdxl_train_textual_inversion.py", [*args, "--output_dir", str(out1), "--gradient_accumulation_steps", "2"])
    assert "training on 2 process(es), MULTI_CPU (gradients averaged by the loop)" in r.stderr
    rank0, rank1 = step_hashes(tmp_path / "h")
    assert rank0 == rank1 and len(rank0) == 3 and len({line.split()[1] for line in rank0}) == 3
    assert re.findall(r"^saved (.*)$", r.stdout, flags=re.MULTILINE) == [str(out2 / "sks.safetensors")]
    assert [p.name for p in out2.iterdir()] == ["sks.safetensors"]
    a, b = load_file(out1 / "sks.safetensors"), load_file(out2 / "sks.safetensors")
    assert set(a) == set(b) == {"clip_l", "clip_g"}
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6, msg=k)
    meta = metadata(out2 / "sks.safetensors")
    assert (meta["ss_batch_size_per_device"], meta["ss_total_batch_size"], meta["ss_steps"]) == ("2", "4", "3")
    assert int(metadata(out1 / "sks.safetensors")["ss_num_batches_per_epoch"]) == 2 * int(meta["ss_num_batches_per_epoch"])


def test_lllite_two_processes_equal_one_process(tiny_ckpt, tmp_path, monkeypatch):
    """ControlNet-LLLite (unwrapped, averaged by the loop): each process's conditioning images travel with
    its images (a different control square per image), so both match one process with the same batches."""
    from tests.integration.test_train_lllite import base_args, write_square_task

    data, cond = write_square_task(tmp_path)
    out1, out2 = tmp_path / "one", tmp_path / "two"
    common = ["--learning_rate", "1e-3", "--train_batch_size", "2", "--enable_bucket", "--min_bucket_reso", "32",
              "--max_bucket_reso", "128", "--bucket_reso_steps", "32"]
    r = launch_two("sdxl_train_control_net_lllite.py", base_args(tiny_ckpt, data, cond, out2, 3, *common),
                   tmp_path / "h", monkeypatch)
    run_one("sdxl_train_control_net_lllite.py",
            base_args(tiny_ckpt, data, cond, out1, 3, *common, "--gradient_accumulation_steps", "2"))
    assert "training on 2 process(es), MULTI_CPU (gradients averaged by the loop)" in r.stderr
    rank0, rank1 = step_hashes(tmp_path / "h")
    assert rank0 == rank1 and len(rank0) == 3 and len({line.split()[1] for line in rank0}) == 3
    assert re.findall(r"^saved (.*)$", r.stdout, flags=re.MULTILINE) == [str(out2 / "lllite.safetensors")]
    assert [p.name for p in out2.iterdir()] == ["lllite.safetensors"]
    a, b = load_file(out1 / "lllite.safetensors"), load_file(out2 / "lllite.safetensors")
    assert a.keys() == b.keys()
    assert any(v.abs().sum() > 0 for k, v in a.items() if k.endswith("up.0.weight"))  # trained (up starts at 0)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6, msg=k)
    meta = metadata(out2 / "lllite.safetensors")
    assert (meta["ss_batch_size_per_device"], meta["ss_total_batch_size"], meta["ss_steps"]) == ("2", "4", "3")


FSDP = ["--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
        "--fsdp_transformer_layer_cls_to_wrap", "BasicTransformerBlock,ResnetBlock2D,CLIPEncoderLayer",
        "--fsdp_state_dict_type", "SHARDED_STATE_DICT"]


def test_fsdp2_two_processes_equal_one_process_and_diffusers_loads(tiny_ckpt, tiny_diffusers, tiny_model_dir, tmp_path):
    """sdxl_train.py with the U-Net and both text encoders sharded by accelerate's FSDP2 plugin on two CPU
    processes (tests/fsdp_on_cpu.py lifts accelerate's GPU-only switch; the sharding is torch's own).
    The gathered checkpoint equals one process accumulating the same batches and loads in diffusers."""
    from diffusers import StableDiffusionXLPipeline

    from library.models.checkpoint_io import load_sdxl

    data = copy_data(tiny_model_dir, tmp_path / "d")
    args = ["--pretrained_model_name_or_path", str(tiny_ckpt), "--train_data_dir", str(data), *DATA,
            "--output_name", "ft", "--max_train_steps", "2", "--learning_rate", "1e-4", "--train_text_encoder",
            "--learning_rate_te1", "1e-5", "--learning_rate_te2", "1e-5", "--optimizer_type", "AdamW"]
    out1, out2 = tmp_path / "one", tmp_path / "two"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *FSDP, "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           "tests/fsdp_on_cpu.py", "sdxl_train.py", *args, "--output_dir", str(out2)]
    r = run_script(cmd, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    run_one("sdxl_train.py", [*args, "--output_dir", str(out1), "--gradient_accumulation_steps", "2"])
    assert "training on 2 process(es), FSDP (FSDP)" in r.stderr
    # AdamW steps of 1e-4: the reduce-scatter sums in another order (~2e-6 apart)
    assert_one_checkpoint_equal(r, out1, out2, tiny_ckpt, atol=5e-6)
    meta = metadata(out2 / "ft.safetensors")
    assert (meta["ss_batch_size_per_device"], meta["ss_total_batch_size"], meta["ss_steps"]) == ("2", "4", "2")

    pipe = StableDiffusionXLPipeline.from_single_file(str(out2 / "ft.safetensors"), config=str(tiny_diffusers))
    ours = load_sdxl(out2 / "ft.safetensors")
    for mine, theirs in ((ours.unet, pipe.unet), (ours.text_encoder1, pipe.text_encoder),
                         (ours.text_encoder2, pipe.text_encoder_2)):
        theirs_state = theirs.state_dict()
        for k, v in mine.state_dict().items():
            assert torch.equal(v, theirs_state[k]), k


def test_fsdp_that_accelerate_did_not_set_up_is_one_line(tiny_ckpt, tiny_model_dir, tmp_path, monkeypatch):
    """--use_fsdp where accelerate sets up no FSDP (here: one process, no GPU) stops before the model
    loads, instead of training unsharded."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    out = tmp_path / "out"
    r = run_main("sdxl_train.py", ["--pretrained_model_name_or_path", str(tiny_ckpt), "--train_data_dir",
                                   str(tiny_model_dir / "train"), *DATA, "--output_dir", str(out),
                                   "--max_train_steps", "1"])
    assert r.returncode == 2
    lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    version = importlib.metadata.version("accelerate")
    expected = (f"error: accelerate launch --use_fsdp: accelerate set up NO, not FSDP (accelerate {version} applies "
                "its FSDP plugin only to GPU processes); on the CPU train with accelerate launch --multi_gpu instead")
    assert lines == [expected], r.stderr[-2000:]
    assert not out.exists() or not any(out.iterdir())  # nothing written (the output folder checked, left empty)
