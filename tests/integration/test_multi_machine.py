"""Two machines emulated on this host: ``accelerate launch --num_machines 2`` once per machine rank.

Each "machine" is its own ``accelerate launch`` (its own torchrun agent) with one process; the two
meet at ``--main_process_ip 127.0.0.1`` and train over gloo on the CPU. Unlike the one-machine
launches of test_multi_process.py, both processes have ``LOCAL_RANK`` 0, so each one is its
machine's local main process: this shows that caching is sharded by the global process index and
that only the global main process (machine 0) locks the output folder and writes the LoRA, even
though both machines share the dataset and output folders.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ROOT
from tests.integration.test_multi_process import (
    _free_port,
    copy_data,
    lora_args,
    run_one,
    step_hashes,
)

pytestmark = pytest.mark.slow

TIMEOUT_S = 300


def machine_command(rank: int, port: int, script_args: list[str]) -> list[str]:
    """The launch line of machine ``rank``; the same on both machines except ``--machine_rank``.
    ``--num_processes`` is the total over the machines (accelerate starts 2 // 2 = 1 per machine)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2",
            "--machine_rank", str(rank), "--num_processes", "2", "--main_process_ip", "127.0.0.1",
            "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no",
            "sdxl_train_network.py", *script_args]


def machine_env(hash_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    env["SDXL_TRAINER_WEIGHT_HASH_DIR"] = str(hash_dir)
    # gloo takes its interface from the address the host name resolves to (127.0.0.1 where this test
    # was written, not on every host); both "machines" talk over loopback here, so it is named. Nothing
    # else is needed: accelerate passes --main_process_ip/port to torchrun, which sets MASTER_ADDR/PORT.
    env["GLOO_SOCKET_IFNAME"] = "lo"
    return env


def stop(proc: subprocess.Popen) -> None:
    """End a launch that is still running. SIGTERM, not SIGKILL: torchrun starts its workers in
    sessions of their own, and only its agent, on SIGTERM, stops them ("shutting down workers")."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_machines(script_args: list[str], hash_dir: Path, log_dir: Path) -> list[tuple[int, str, str]]:
    """Start machine 0 then machine 1 and wait for both; ``(returncode, stdout, stderr)`` per machine.

    If one machine fails, the other would wait for it at the next collective until gloo's timeout,
    so it is stopped at once."""
    port, env = _free_port(), machine_env(hash_dir)
    with contextlib.ExitStack() as logs:
        procs = []
        for rank in range(2):
            out = logs.enter_context(open(log_dir / f"m{rank}.out", "w"))
            err = logs.enter_context(open(log_dir / f"m{rank}.err", "w"))
            procs.append(subprocess.Popen(machine_command(rank, port, script_args), cwd=ROOT, env=env,
                                          stdout=out, stderr=err))
        deadline = time.monotonic() + TIMEOUT_S
        try:
            codes = [p.poll() for p in procs]  # every one polled (any() would stop at the first running)
            while None in codes and not set(codes) - {None, 0} and time.monotonic() < deadline:
                time.sleep(0.5)
                codes = [p.poll() for p in procs]
        finally:
            for p in procs:
                stop(p)
    return [(p.returncode, (log_dir / f"m{rank}.out").read_text(), (log_dir / f"m{rank}.err").read_text())
            for rank, p in enumerate(procs)]


def test_lora_on_two_machines_equals_one_process(tiny_ckpt, tiny_model_dir, tmp_path):
    data_two, data_one = copy_data(tiny_model_dir, tmp_path / "d2"), copy_data(tiny_model_dir, tmp_path / "d1")
    out_two, out_one = tmp_path / "two", tmp_path / "one"
    # Global batch 2 x 2 as in the one-machine test: warm-up 2 scheduler steps = 1 optimizer step
    results = run_machines(lora_args(tiny_ckpt, data_two, out_two, "--lr_warmup_steps", "2"), tmp_path / "h",
                           tmp_path)
    assert [code for code, _, _ in results] == [0, 0], "\n".join(
        f"machine {rank} (exit {code}):\n{err[-3000:]}" for rank, (code, _, err) in enumerate(results))
    (_, out0, err0), (_, out1, err1) = results

    rank0, rank1 = step_hashes(tmp_path / "h")  # rank<global process index>.txt
    assert rank0 == rank1 and [line.split()[0] for line in rank0] == ["1", "2", "3", "4"]
    assert len({line.split()[1] for line in rank0}) == 4

    # global process 1 runs on machine 0 and process 2 on machine 1, each caching its own half of the
    # shared dataset folder (and reading the other half from the other machine's files)
    for what in ("latents", "text-encoder outputs"):
        pattern = rf"{what}: (\d+) computed, (\d+) reused \(process (\d) of 2\)"
        assert re.findall(pattern, err0) == [("4", "0", "1")], err0[-2000:]
        assert re.findall(pattern, err1) == [("4", "0", "2")], err1[-2000:]
    assert len(list(data_two.rglob("*.npz"))) == 16

    # machine 0 alone wrote the LoRA (machine 1 is a local main process, not the main process)
    assert re.findall(r"^saved (.*)$", out0, flags=re.MULTILINE) == [str(out_two / "lora.safetensors")]
    assert "saved " not in out1
    assert [p.name for p in out_two.iterdir()] == ["lora.safetensors"]

    # the same weights as one process accumulating the same 2 batches per step
    run_one("sdxl_train_network.py", lora_args(tiny_ckpt, data_one, out_one, "--lr_warmup_steps", "1",
                                               "--gradient_accumulation_steps", "2"))
    a, b = load_file(out_one / "lora.safetensors"), load_file(out_two / "lora.safetensors")
    assert a.keys() == b.keys()
    assert max(v.abs().max().item() for k, v in a.items() if "lora_up" in k) > 1e-3  # trained
    for k in a:  # the tolerance of the one-machine test (TE cache batches of 4 vs 8 captions)
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=2e-5, msg=k)
