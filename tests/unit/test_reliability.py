"""Unit tests of the reliability modules: output folders, state files, save guard, fingerprints, messages."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from library.errors import UserError
from library.training import output_dir as od
from library.training import save_guard, state_io
from tests.conftest import ROOT


# --- output folders -----------------------------------------------------------------------------------


def test_check_writable_dir(tmp_path: Path) -> None:
    made = od.check_writable_dir(tmp_path / "a" / "b", "--output_dir")
    assert made.is_dir() and not list(made.iterdir())  # the probe is gone
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(UserError, match="is an existing file"):
        od.check_writable_dir(f, "--output_dir")
    with pytest.raises(UserError, match="is a file, so the folder cannot be created"):
        od.check_writable_dir(f / "sub", "--logging_dir")
    assert f.read_text() == "x"


def test_lock_refuses_a_second_holder_and_is_freed_by_death(tmp_path: Path) -> None:
    with od.OutputLock(tmp_path):
        with pytest.raises(UserError, match=rf"in use by another run \(process {os.getpid()}\)"):
            od.OutputLock(tmp_path).acquire()
    assert not (tmp_path / od.LOCK_NAME).exists()  # a finished run leaves no lock file
    od.OutputLock(tmp_path).acquire().release()  # free again
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]);"
                               "from library.training.output_dir import OutputLock;"
                               "OutputLock(sys.argv[2]).acquire(); print('held', flush=True); time.sleep(60)",
                               str(ROOT), str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(UserError, match="in use by another run"):
        od.OutputLock(tmp_path).acquire()
    holder.kill()  # SIGKILL: the kernel drops the flock, no stale lock remains
    holder.wait()
    od.OutputLock(tmp_path).acquire().release()


def test_only_our_temporaries_are_removed(tmp_path: Path) -> None:
    ours = [".lora.safetensors.a1b2c3d4.tmp", ".lora-state.partial_.tmp", "model.tmp-saving", "model.tmp-old",
            ".sdxl_trainer_write_probe.xyz.tmp"]
    users = ["notes.tmp", ".notes.tmp", "a.tmp-saving.bak", ".x.toolongname9.tmp", ".x.ABCDEFGH.tmp", "tmp",
             "lora.safetensors"]
    for name in ours[:2] + users:
        (tmp_path / name).write_text("x")
    for name in ours[2:4]:
        (tmp_path / name).mkdir()
    (tmp_path / "sample").mkdir()
    (tmp_path / "sample" / ".im_000001.png.zz99yy88.tmp").write_text("x")
    removed = od.remove_orphaned_temp_files(tmp_path)
    assert sorted(p.name for p in removed) == sorted(ours[:4] + [".im_000001.png.zz99yy88.tmp"])
    assert sorted(os.listdir(tmp_path)) == sorted(users + ["sample"])


# --- state folders ------------------------------------------------------------------------------------


def test_object_state_round_trip_without_pickle(tmp_path: Path) -> None:
    state = {"shadow": {"unet.w": torch.randn(3, 2), "te.b": torch.zeros(4, dtype=torch.bfloat16)}, "updates": 7,
             "note": None, "steps": [1, 2.5, "x"]}
    path = tmp_path / "custom_state_0.safetensors"
    state_io.save_object_state(state, path)
    back = state_io.load_object_state(path)
    assert back["updates"] == 7 and back["note"] is None and back["steps"] == [1, 2.5, "x"]
    assert torch.equal(back["shadow"]["unet.w"], state["shadow"]["unet.w"])
    assert back["shadow"]["te.b"].dtype == torch.bfloat16
    with pytest.raises(TypeError):
        state_io.save_object_state({"f": object()}, tmp_path / "bad.safetensors")


def test_read_marker_messages(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        state_io.read_marker(tmp_path / "missing")
    partial = tmp_path / ".lora-state.partial_.tmp"
    partial.mkdir()
    with pytest.raises(UserError, match="interrupted save"):
        state_io.read_marker(partial)
    folder = tmp_path / "lora-state"
    folder.mkdir()
    (folder / "optimizer.bin").write_bytes(b"12345")
    with pytest.raises(UserError, match="incomplete or not written by --save_state"):
        state_io.read_marker(folder)
    marker = {"format": state_io.STATE_FORMAT, "version": state_io.STATE_VERSION, "progress": {},
              "files": {"optimizer.bin": 5}}
    (folder / state_io.MARKER_FILE).write_text(json.dumps(marker))
    assert state_io.read_marker(folder)["files"] == {"optimizer.bin": 5}
    (folder / "optimizer.bin").write_bytes(b"1234")  # truncated
    with pytest.raises(UserError, match="missing or changed"):
        state_io.read_marker(folder)
    (folder / state_io.MARKER_FILE).write_text(json.dumps({"format": "other"}))
    with pytest.raises(UserError, match="not a state marker"):
        state_io.read_marker(folder)


# --- the save guard -----------------------------------------------------------------------------------


def test_save_guard() -> None:
    good = [torch.ones(3), torch.full((2, 2), -1e19)]
    assert save_guard.weights_are_sound(good)
    assert not save_guard.weights_are_sound(good + [torch.tensor([0.0, float("nan")])])
    assert not save_guard.weights_are_sound(good + [torch.tensor([float("-inf")])])
    assert not save_guard.weights_are_sound(good + [torch.tensor([2e20])])
    msg = str(save_guard.broken_weights_error(12, Path("out/lora-step00000010.safetensors")))
    assert "step 12" in msg and "out/lora-step00000010.safetensors" in msg and "\n" not in msg
    assert "this run had written no save yet" in str(save_guard.broken_weights_error(3, None))


# --- disk full ----------------------------------------------------------------------------------------


def test_no_space_keeps_the_previous_file(tmp_path: Path) -> None:
    """A save that hits the file-size limit (the kernel's EFBIG, like a full disk) is one line naming the
    file and the size; the previous file is intact and no temporary is left."""
    target = tmp_path / "lora.safetensors"
    code = (
        "import resource, signal, sys, torch\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from safetensors.torch import save_file\n"
        "from library.errors import UserError\n"
        "from library.models.atomic import atomic_path\n"
        f"target = {str(target)!r}\n"
        "with atomic_path(target) as tmp: save_file({'w': torch.ones(1000)}, str(tmp))\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))\n"
        "big = {'w': torch.zeros(100_000)}\n"
        "try:\n"
        "    with atomic_path(target, size_hint=400_000) as tmp: save_file(big, str(tmp))\n"
        "except UserError as exc: print(exc)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    line = r.stdout.strip()
    assert line.startswith(f"cannot write {target}: no space") and "390.6 KB needed" in line, line
    assert "the previous lora.safetensors is intact" in line and "\n" not in line
    from safetensors.torch import load_file

    assert torch.equal(load_file(target)["w"], torch.ones(1000))
    assert os.listdir(tmp_path) == ["lora.safetensors"]


# --- messages -----------------------------------------------------------------------------------------


def test_nan_learning_rate_is_named(tiny_ckpt, tmp_path: Path) -> None:
    import sdxl_train_network

    with pytest.raises(UserError, match="--learning_rate must be a finite number, got nan"):
        sdxl_train_network.main(["--pretrained_model_name_or_path", str(tiny_ckpt), "--train_data_dir",
                                 str(tmp_path), "--output_dir", str(tmp_path / "o"), "--network_module",
                                 "networks.lora", "--learning_rate", "nan"])


def test_empty_lora_file_and_non_vae_file_are_errors(tiny_ckpt, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from library.models.checkpoint_io import load_sdxl, load_vae
    from networks.lora import create_network

    empty = tmp_path / "empty.safetensors"
    save_file({}, str(empty))
    models = load_sdxl(tiny_ckpt)
    net = create_network(1.0, 4, 4, models.vae, [models.text_encoder1, models.text_encoder2], models.unet)
    with pytest.raises(UserError, match=f"{empty}: the file holds no tensors"):
        net.load_weights(empty)
    lora = tmp_path / "lora.safetensors"
    net.save_weights(lora)
    with pytest.raises(UserError, match=f"{lora}: no VAE tensors in this file"):
        load_vae(lora)


def _dataset_values(train: Path) -> dict:
    return {"train_data_dir": str(train), "resolution": "64", "enable_bucket": True, "min_bucket_reso": 32,
            "max_bucket_reso": 128, "bucket_reso_steps": 32, "caption_extension": ".caption"}


def test_skipped_inputs_are_counted_and_named_once(tiny_model_dir, tmp_path: Path, caplog) -> None:
    """Items 8 and 9: folders with 0 / negative repeats or no images, GIFs, looping links and blank captions."""
    from library.data.dataset import build_dataset_group

    train = tmp_path / "train"
    shutil.copytree(tiny_model_dir / "train" / "10_sks shape", train / "10_sks shape")
    for name in ("0_zero", "-2_neg"):
        shutil.copytree(tiny_model_dir / "train" / "10_sks shape", train / name)
    (train / "3_empty").mkdir()
    sks = train / "10_sks shape"
    Image.new("RGB", (64, 64)).save(sks / "anim.gif")
    (sks / "one.gif").write_bytes((sks / "anim.gif").read_bytes())
    os.symlink("loop.png", sks / "loop.png")
    (sks / "img_001.caption").write_text("  \n", encoding="utf-8")
    with caplog.at_level(logging.WARNING):
        group = build_dataset_group(_dataset_values(train))
    assert len(group.items) == 8
    text = caplog.text
    assert "-2_neg because num_repeats = -2" in text and "0_zero because num_repeats = 0" in text
    assert f"no images found in {train / '3_empty'}" in text
    assert text.count("not supported images") == 1 and "2 file(s)" in text and "anim.gif, one.gif" in text
    assert "1 broken or looping symbolic link(s)" in text and "loop.png" in text
    assert "class tokens 'sks shape' are not used" in text and "img_001.png" in text


# --- cache provenance ---------------------------------------------------------------------------------


def test_content_edit_keeping_size_and_mtime_is_recomputed(tiny_model_dir, tiny_ckpt, tmp_path: Path) -> None:
    """Item 3a: the image is hashed during the scan, so an edit that keeps size and mtime is seen."""
    from library.data.cachers import LatentCacheOptions, VaeEncoder, module_fingerprint
    from library.data.dataset import build_dataset_group
    from library.models.checkpoint_io import load_vae

    train = tmp_path / "train"
    shutil.copytree(tiny_model_dir / "train", train)
    png = next(train.rglob("img_003.png"))
    image = png.with_suffix(".bmp")  # uncompressed: a pixel edit keeps the file size
    Image.open(png).convert("RGB").save(image)
    png.unlink()
    vae = load_vae(tiny_ckpt)
    opts = LatentCacheOptions(to_disk=True, show_progress=False, num_workers=0)

    def cache():
        group = build_dataset_group(_dataset_values(train))
        return group.cache_latents(VaeEncoder(vae, "cpu", torch.float32), module_fingerprint(vae), opts)

    assert cache().computed == 8
    st = image.stat()
    arr = np.asarray(Image.open(image)).copy()
    arr[0, 0] = 255 - arr[0, 0]
    Image.fromarray(arr).save(image)
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert image.stat().st_size == st.st_size and image.stat().st_mtime_ns == st.st_mtime_ns
    report = cache()
    assert (report.computed, report.reused) == (1, 7)


def test_module_fingerprint_follows_weights_not_path_or_dtype(tiny_ckpt, tmp_path: Path) -> None:
    """Item 3b: the same weights in another file or dtype keep the id; changed weights change it."""
    from library.data.cachers import module_fingerprint
    from library.models.checkpoint_io import load_vae

    vae = load_vae(tiny_ckpt, torch.float32)
    base = module_fingerprint(vae)
    half = load_vae(tiny_ckpt, torch.float16).to(torch.float32)
    exact = {k: v.to(torch.float16).float() for k, v in vae.state_dict().items()}
    vae16 = load_vae(tiny_ckpt, torch.float32)
    vae16.load_state_dict(exact)
    assert module_fingerprint(half) == module_fingerprint(vae16)  # fp16 weights read as fp16 or as fp32
    copy = tmp_path / "moved.safetensors"
    shutil.copy(tiny_ckpt, copy)
    assert module_fingerprint(load_vae(copy, torch.float32)) == base
    with torch.no_grad():
        next(iter(vae.parameters())).view(-1)[-1] += 1e-3  # one value at the end of one tensor
    assert module_fingerprint(vae) != base


def test_bom_config_file(tmp_path: Path) -> None:
    """Item 13: a --config_file starting with a UTF-8 byte-order mark is read."""
    from library.config.args import build_trainer_parser, parse_args_with_config

    cfg = tmp_path / "c.toml"
    cfg.write_bytes("\ufefflearning_rate = 0.25\n[saving]\noutput_name = \"x\"\n".encode("utf-8"))
    ns = parse_args_with_config(build_trainer_parser("train_network", description="t"),
                                ["--config_file", str(cfg)])
    assert ns.learning_rate == 0.25 and ns.output_name == "x"
