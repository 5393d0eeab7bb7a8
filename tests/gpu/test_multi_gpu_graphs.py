"""On two CUDA GPUs (NCCL): LoRA steps graphed on every process equal eager ones.

Run on a lent machine of two or more GPUs: ``python -m pytest -m gpu tests/gpu -q`` (skipped with fewer;
never in CI). The CPU suite checks the same with gloo and the graph emulation
(tests/integration/test_multi_process.py); this checks the real graphs with NCCL's all-reduce after
each replay.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.integration.test_multi_process import copy_data, launch_two, lora_args, step_hashes

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")]


def test_lora_graphed_on_two_gpus_equals_eager(tiny_ckpt, tiny_model_dir, tmp_path, monkeypatch):
    args = ["--max_train_steps", "12", "--gradient_checkpointing", "--mixed_precision", "bf16"]
    weights, hashes, logs = {}, {}, {}
    for mode in ("off", "auto"):
        data = copy_data(tiny_model_dir, tmp_path / f"d_{mode}")
        out, hash_dir = tmp_path / f"out_{mode}", tmp_path / f"h_{mode}"
        r = launch_two("sdxl_train_network.py", lora_args(tiny_ckpt, data, out, *args, "--cuda_graphs", mode),
                       hash_dir, monkeypatch)
        weights[mode], hashes[mode], logs[mode] = load_file(out / "lora.safetensors"), step_hashes(hash_dir), r.stderr
    log = logs["auto"]
    assert log.count("CUDA graphs on") == 2 and log.count("captured a CUDA graph") >= 3, log[-4000:]
    assert "capture failed" not in log, log[-4000:]
    assert hashes["auto"][0] == hashes["auto"][1]  # the processes agree after every step
    for key, tensor in weights["off"].items():
        a, b = tensor.float(), weights["auto"][key].float()
        assert float((a - b).norm() / a.norm().clamp(min=1e-12)) < 1e-2, key
