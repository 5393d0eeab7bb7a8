"""Reliability and safety (issue 16), driven the way users drive the scripts.

One shared trained run (latents and text-encoder outputs cached ahead by the tools, options from a config file
with a UTF-8 BOM, step saves with states) serves several checks; the others are short runs that
stop before any model loads, plus one diverging run and one killed run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ROOT, run_main, run_script

pytestmark = pytest.mark.slow

MODEL_OPTS = ["--resolution", "64", "--enable_bucket", "--min_bucket_reso", "32", "--max_bucket_reso", "128",
              "--bucket_reso_steps", "32", "--max_data_loader_n_workers", "0", "--seed", "1"]


def lora_args(ckpt: Path, data: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return ["sdxl_train_network.py", "--pretrained_model_name_or_path", str(ckpt), "--train_data_dir", str(data),
            *MODEL_OPTS, "--output_dir", str(out), "--output_name", "lora", "--network_module", "networks.lora",
            "--network_dim", "4", "--network_alpha", "4", "--network_train_unet_only", "--cache_latents",
            "--cache_text_encoder_outputs", "--learning_rate", "1e-3", "--max_train_steps", str(steps),
            "--train_batch_size", "2", "--log_every_n_steps", "1", *extra]


def one_error_line(r: subprocess.CompletedProcess) -> str:
    """The single ``error:`` line of a failed run (exit 2, no traceback)."""
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, r.stderr[-2000:]
    return lines[0]


def fails_in_process(argv: list[str]) -> str:
    """Run a script's ``main(argv)`` here (no interpreter start-up) and return its UserError line."""
    import importlib

    from library.errors import UserError

    module = importlib.import_module(Path(argv[0]).stem)
    with pytest.raises(UserError) as info:
        module.main(argv[1:])
    message = str(info.value)
    assert "\n" not in message, message
    return message


def env_with_root() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


@pytest.fixture(scope="module")
def shared(tiny_model_dir, tmp_path_factory):
    """Latents cached by the tool, then a run from a BOM config file that reuses them (items 12, 13)."""
    root = tmp_path_factory.mktemp("reliab")
    data = root / "train"
    shutil.copytree(tiny_model_dir / "train", data)
    ckpt = tiny_model_dir / "tiny_sdxl.safetensors"
    import contextlib
    import io

    from tools import cache_latents, cache_text_encoder_outputs

    tool_args = ["--pretrained_model_name_or_path", str(ckpt), "--train_data_dir", str(data), *MODEL_OPTS,
                 "--sdxl"]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):  # in process: the trainer below is the real launch
        cache_latents.main(tool_args)
        cache_text_encoder_outputs.main(tool_args)
    assert "latents: 8 computed" in printed.getvalue() and "outputs: 8 computed" in printed.getvalue()
    caches = sorted(data.rglob("*_sdxl.npz")) + sorted(data.rglob("*_te_outputs.npz"))
    assert len(caches) == 16
    mtimes = {p: p.stat().st_mtime_ns for p in caches}
    out = root / "out"
    config = root / "config.toml"
    config.write_text("\ufeff# saved by a Windows editor\n[model]\npretrained_model_name_or_path = "
                      f"{json.dumps(str(ckpt))}\n[saving]\nsave_every_n_steps = 2\nsave_state = true\n",
                      encoding="utf-8")
    args = [a for a in lora_args(ckpt, data, out, 4) if a != "--cache_latents"]
    i = args.index("--pretrained_model_name_or_path")
    del args[i:i + 2]
    args[args.index("--cache_text_encoder_outputs")] = "--cache_text_encoder_outputs_to_disk"
    r = run_main(args[0], [*args[1:], "--cache_latents_to_disk", "--config_file", str(config)])
    assert r.returncode == 0, r.stderr[-3000:]
    return {"root": root, "data": data, "ckpt": ckpt, "out": out, "log": r.stderr, "caches": mtimes}


def test_tool_cache_reused_and_bom_config(shared):
    """Items 12 and 13: the trainer reuses every latent and text-encoder output the tools cached (no file
    rewritten) and the config file with a byte-order mark was read (its save options took effect)."""
    assert "latents: 0 computed, 8 reused" in shared["log"], shared["log"][-3000:]
    assert "text-encoder outputs: 0 computed, 8 reused" in shared["log"], shared["log"][-3000:]
    for path, mtime in shared["caches"].items():
        assert path.stat().st_mtime_ns == mtime, path
    out = shared["out"]
    assert (out / "lora-step00000002.safetensors").is_file() and (out / "lora-step00000002-state").is_dir()
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_output_folder_checked_before_loading(shared, tmp_path):
    """Item 1: an --output_dir that is a file (a real launch: exit 2, one line), one that cannot be
    created, a --logging_dir that is a file and a --outdir that is a file: one line each, before any
    model loads, the file untouched."""
    blocker = tmp_path / "occupied"
    blocker.write_bytes(b"user data")
    r = run_script([sys.executable, *lora_args(shared["ckpt"], shared["data"], blocker, 2)])
    assert "is an existing file" in one_error_line(r) and str(blocker) in r.stderr
    assert "INFO library.data.dataset" not in r.stderr  # stopped before the dataset scan
    assert blocker.read_bytes() == b"user data"
    msg = fails_in_process(lora_args(shared["ckpt"], shared["data"], Path("/proc/1/no/out"), 2))
    assert "--output_dir /proc/1/no/out cannot be created" in msg
    msg = fails_in_process(lora_args(shared["ckpt"], shared["data"], tmp_path / "o", 2, "--logging_dir",
                                     str(blocker)))
    assert msg.startswith(f"--logging_dir {blocker} is an existing file")
    msg = fails_in_process(["sdxl_gen_img.py", "--ckpt", str(shared["ckpt"]), "--outdir", str(blocker),
                            "--prompt", "a cat", "--W", "64", "--H", "64", "--steps", "1"])
    assert msg.startswith(f"--outdir {blocker} is an existing file")
    assert blocker.read_bytes() == b"user data"


def test_bad_sample_prompts_fail_before_training(shared, tmp_path, caplog):
    """Item 5: a malformed prompt file is reported (file and line) before any model loads; nothing is written."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a good prompt --w 64 --h 64\na bad one --w wide\n", encoding="utf-8")
    out = tmp_path / "o"
    msg = fails_in_process(lora_args(shared["ckpt"], shared["data"], out, 2, "--sample_prompts", str(prompts),
                                     "--sample_every_n_steps", "1"))
    assert f"{prompts}:2" in msg, msg
    assert not out.exists()  # checked before even the output folder was prepared


class _Evil:
    """Unpickled without weights_only, this runs ``exec(payload)``."""

    def __init__(self, payload: str):
        self.payload = payload

    def __reduce__(self):
        return (exec, (self.payload,))


def _malicious_pickle(path: Path, marker: Path) -> None:
    """A torch file whose unpickling (weights_only=False) would create ``marker``."""
    torch.save({"state": _Evil(f"open({str(marker)!r}, 'w').close()")}, path)


def test_resume_never_runs_code_and_refuses_foreign_folders(shared, tmp_path):
    """Items 6 and 8: a state folder carrying a malicious pickle (as a custom checkpoint, or as the
    optimizer file with the marker edited to match) is refused with one line and its code never runs;
    an empty or foreign folder is one line too."""
    marker = tmp_path / "pwned"
    probe = tmp_path / "probe.bin"
    _malicious_pickle(probe, marker)
    torch.load(probe, weights_only=False)  # our own payload: it only creates the marker file
    assert marker.exists()  # the pickle really is malicious
    marker.unlink()

    state = tmp_path / "custom-state"
    shutil.copytree(shared["out"] / "lora-step00000002-state", state)
    _malicious_pickle(state / "custom_checkpoint_0.pkl", marker)
    edited = tmp_path / "edited-state"
    shutil.copytree(shared["out"] / "lora-step00000002-state", edited)
    _malicious_pickle(edited / "optimizer.bin", marker)
    meta = json.loads((edited / "sdxl_trainer_state.json").read_text())
    meta["files"]["optimizer.bin"] = (edited / "optimizer.bin").stat().st_size
    (edited / "sdxl_trainer_state.json").write_text(json.dumps(meta))
    empty = tmp_path / "empty"
    empty.mkdir()
    expected = {state: "pickled custom checkpoint", edited: "not a plain tensor file", empty: "no sdxl_trainer_state"}
    for folder, message in expected.items():
        line = fails_in_process(lora_args(shared["ckpt"], shared["data"], tmp_path / "o", 4,
                                          "--resume", str(folder)))
        assert message in line and line.startswith("--resume"), line
    assert not marker.exists()


def test_diverging_run_keeps_the_last_finite_save(shared, tmp_path):
    """Item 2 (and 11): the learning rate warms up to 1e26, so the weights explode at step 2. The step-1
    save stays (not rotated away by --save_last_n_steps 1), nothing newer is written, and the message names
    it. While that run holds the folder, a second run on it is refused with one line."""
    out = tmp_path / "o"
    cmd = [sys.executable, *lora_args(shared["ckpt"], shared["data"], out, 6, "--save_every_n_steps", "1",
                                      "--save_last_n_steps", "1", "--log_every_n_steps", "100",
                                      "--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "4",
                                      "--max_grad_norm", "0")]
    cmd[cmd.index("--learning_rate") + 1] = "1e26"
    first = subprocess.Popen(cmd, cwd=ROOT, env=env_with_root(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    lock = out / ".sdxl_trainer.lock"
    deadline = time.time() + 60
    while time.time() < deadline and not (lock.is_file() and lock.read_text().strip()):
        time.sleep(0.05)
    msg = fails_in_process(lora_args(shared["ckpt"], shared["data"], out, 2))
    assert "is in use by another run" in msg and f"(process {first.pid})" in msg
    _, stderr = first.communicate(timeout=300)
    r = subprocess.CompletedProcess(cmd, first.returncode, "", stderr)
    line = one_error_line(r)
    good = out / "lora-step00000001.safetensors"
    assert "exploded" in line and str(good) in line, line
    assert good.is_file() and all(torch.isfinite(t).all() for t in load_file(good).values())
    assert sorted(p.name for p in out.glob("*.safetensors")) == [good.name]


def test_kill_during_save_state_leaves_no_half_state(shared, tmp_path):
    """Items 4 and 10: kill -9 while a state folder is being written. No folder under a final name is
    incomplete; --resume of the partial folder is one line; the next start in that folder removes our
    temporaries (and only ours)."""
    out = tmp_path / "o"
    cmd = [sys.executable, *lora_args(shared["ckpt"], shared["data"], out, 400, "--save_every_n_steps", "1",
                                      "--save_state")]
    partial = None
    for _attempt in range(3):
        shutil.rmtree(out, ignore_errors=True)
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env_with_root(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            found = [n for n in os.listdir(out) if n.endswith(".partial_.tmp")] if out.is_dir() else []
            if found:
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.001)
        proc.wait(timeout=60)
        assert proc.returncode == -signal.SIGKILL
        partial = next((p for p in out.iterdir() if p.name.endswith(".partial_.tmp")), None)
        if partial is not None:
            break
    assert partial is not None, "the kill never landed inside a state save"
    for state in out.glob("*-state"):
        assert (state / "sdxl_trainer_state.json").is_file(), state  # complete, or not there at all
    msg = fails_in_process(lora_args(shared["ckpt"], shared["data"], tmp_path / "r", 2, "--resume", str(partial)))
    assert "interrupted save" in msg

    orphan = out / ".lora.safetensors.k3x9q2ab.tmp"  # what a kill inside a model save leaves
    orphan.write_bytes(b"partial")
    users = [out / "notes.tmp", out / ".draft.tmp", out / "lora.tmp-saving.txt"]
    for f in users:
        f.write_text("mine")
    no_images = tmp_path / "no_images"
    (no_images / "1_x").mkdir(parents=True)
    assert "no usable training images" in fails_in_process(lora_args(shared["ckpt"], no_images, out, 2))
    assert not partial.exists() and not orphan.exists()
    assert all(f.read_text() == "mine" for f in users)
