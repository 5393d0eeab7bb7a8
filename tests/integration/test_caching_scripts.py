"""End to end: tools/cache_latents.py, tools/cache_text_encoder_outputs.py and
prepare_buckets_latents.py on the tiny model, on the CPU (one run under ``accelerate launch``)."""

from __future__ import annotations

import json
import re
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import ROOT, run_main, run_script

pytestmark = pytest.mark.slow

SIZES = [(64, 64), (96, 64), (64, 96), (128, 72), (72, 128), (80, 80)]
DATA_ARGS = ["--resolution", "64", "--enable_bucket", "--min_bucket_reso", "32", "--max_bucket_reso", "128",
             "--bucket_reso_steps", "32", "--sdxl"]


def _write_images(folder: Path, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (w, h) in enumerate(SIZES):
        path = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        (folder / f"img{i}.caption").write_text(f"sks shape, number {i % 2}", encoding="utf-8")
        paths.append(path)
    return paths


def _counts(text: str, what: str) -> list[tuple[int, int]]:
    """(computed, reused) from each '[process i/n] <what>: N computed, M reused' line."""
    return [(int(a), int(b)) for a, b in re.findall(rf"\] {what}: (\d+) computed, (\d+) reused", text)]


def _run_in_process(main, argv: list[str], capsys) -> str:
    main(argv)
    return capsys.readouterr().out


@pytest.fixture
def data(tmp_path: Path) -> Path:
    _write_images(tmp_path / "train" / "2_sks shape")
    return tmp_path / "train"


def test_cache_latents_tool_writes_reuses_and_recomputes_edits(data: Path, tiny_ckpt: Path, capsys) -> None:
    from tools.cache_latents import main

    argv = ["--pretrained_model_name_or_path", str(tiny_ckpt), "--train_data_dir", str(data), *DATA_ARGS,
            "--vae_batch_size", "2", "--flip_aug"]
    assert _counts(_run_in_process(main, argv, capsys), "latents") == [(6, 0)]
    folder = data / "2_sks shape"
    files = {}
    for i, (w, h) in enumerate(SIZES):
        path = folder / f"img{i}_{w:04d}x{h:04d}_sdxl.npz"
        with np.load(path) as npz:
            lat = npz["latents"]
            assert lat.dtype == np.float32 and lat.shape[0] == 4 and np.isfinite(lat).all()
            assert npz["latents_flipped"].shape == lat.shape
            assert list(npz["original_size"]) == [w, h]
            l, t, r, b = npz["crop_ltrb"]
            assert ((r - l) // 8, (b - t) // 8) == (lat.shape[2], lat.shape[1])
        files[path] = path.stat().st_mtime_ns
    assert _counts(_run_in_process(main, argv + ["--skip_existing"], capsys), "latents") == [(0, 6)]
    assert all(p.stat().st_mtime_ns == m for p, m in files.items())
    edited = folder / "img3.png"
    Image.fromarray(np.zeros((72, 128, 3), dtype=np.uint8)).save(edited)  # same size, new pixels
    assert _counts(_run_in_process(main, argv + ["--skip_existing"], capsys), "latents") == [(1, 5)]
    changed = [p.name for p, m in files.items() if p.stat().st_mtime_ns != m]
    assert changed == ["img3_0128x0072_sdxl.npz"]


def test_cache_text_encoder_outputs_tool(data: Path, tiny_ckpt: Path, capsys) -> None:
    from tools.cache_text_encoder_outputs import main

    argv = ["--pretrained_model_name_or_path", str(tiny_ckpt), "--train_data_dir", str(data), *DATA_ARGS,
            "--skip_existing", "--text_encoder_batch_size", "4"]
    assert _counts(_run_in_process(main, argv, capsys), "text-encoder outputs") == [(6, 0)]
    folder = data / "2_sks shape"
    with np.load(folder / "img0_te_outputs.npz") as npz:
        assert npz["hidden_state1"].shape == (77, 64) and npz["hidden_state2"].shape == (77, 128)
        assert npz["pool2"].shape == (128,)
    before = {p: p.stat().st_mtime_ns for p in folder.glob("*_te_outputs.npz")}
    (folder / "img4.caption").write_text("sks shape, edited caption", encoding="utf-8")
    assert _counts(_run_in_process(main, argv, capsys), "text-encoder outputs") == [(1, 5)]
    assert [p.name for p, m in before.items() if p.stat().st_mtime_ns != m] == ["img4_te_outputs.npz"]


def test_te_tool_rejects_shuffle_caption_before_loading(tmp_path: Path, data: Path, tiny_ckpt: Path) -> None:
    toml = tmp_path / "data.toml"
    toml.write_text(f'[general]\nresolution = 64\nshuffle_caption = true\n[[datasets]]\n'
                    f'[[datasets.subsets]]\nimage_dir = "{data / "2_sks shape"}"\n')
    result = run_script([sys.executable, "tools/cache_text_encoder_outputs.py", "--pretrained_model_name_or_path",
                         str(tiny_ckpt), "--dataset_config", str(toml)], timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: --cache_text_encoder_outputs cannot be used with shuffle_caption")
    assert "data.toml" in lines[-1] and "Traceback" not in result.stderr
    assert not list((data / "2_sks shape").glob("*.npz"))
    missing = run_main("tools/cache_latents.py", ["--pretrained_model_name_or_path",  # launched for real below
                       str(tmp_path / "missing.safetensors"), "--train_data_dir", str(data)])
    assert missing.returncode == 2 and missing.stderr.strip().splitlines()[-1] == (
        f"error: --pretrained_model_name_or_path: file or folder not found: {tmp_path / 'missing.safetensors'}")


def test_prepare_buckets_latents_end_to_end(tmp_path: Path, tiny_model_dir: Path, capsys) -> None:
    import prepare_buckets_latents

    images = _write_images(tmp_path / "ft")
    meta = {p.stem: {"caption": "a shape", "tags": "red, blue"} for p in images}
    (tmp_path / "in.json").write_text(json.dumps(meta), encoding="utf-8")
    argv = [str(tmp_path / "ft"), str(tmp_path / "in.json"), str(tmp_path / "out.json"),
            str(tiny_model_dir / "tiny_sdxl_diffusers"), "--max_resolution", "64,64", "--min_bucket_reso", "32",
            "--max_bucket_reso", "128", "--bucket_reso_steps", "32", "--batch_size", "2", "--flip_aug"]
    out = _run_in_process(prepare_buckets_latents.main, argv, capsys)
    assert "latents: 6 computed, 0 reused" in out
    result = json.loads((tmp_path / "out.json").read_text(encoding="utf-8"))
    for path, (w, h) in zip(images, SIZES):
        entry = result[path.stem]
        assert entry["caption"] == "a shape" and entry["image_size"] == [w, h]
        bw, bh = entry["train_resolution"]
        with np.load(path.with_suffix(".npz")) as npz:
            assert npz["latents"].shape == (4, bh // 8, bw // 8) and "latents_flipped" in npz.files
    out = _run_in_process(prepare_buckets_latents.main, argv + ["--skip_existing"], capsys)
    assert "latents: 0 computed, 6 reused" in out
    # training on the prepared metadata picks the legacy .npz files up without recomputing
    from library.data.cachers import LatentCacheOptions, VaeEncoder, module_fingerprint
    from library.data.dataset import build_dataset_group
    from library.models.checkpoint_io import load_vae

    group = build_dataset_group({"train_data_dir": str(tmp_path / "ft"), "in_json": str(tmp_path / "out.json"),
                                 "resolution": "64", "enable_bucket": True, "min_bucket_reso": 32,
                                 "max_bucket_reso": 128, "bucket_reso_steps": 32, "flip_aug": True})
    vae = load_vae(tiny_model_dir / "tiny_sdxl.safetensors")
    report = group.cache_latents(VaeEncoder(vae, "cpu", vae.dtype), module_fingerprint(vae),
                                 LatentCacheOptions(to_disk=True, show_progress=False))
    assert (report.computed, report.reused) == (0, 6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cache_latents_under_accelerate_two_processes(data: Path, tiny_ckpt: Path, monkeypatch) -> None:
    # `accelerate launch --cpu` starts a single process; --multi_gpu on a machine without CUDA
    # starts torchrun workers that the tool joins as a CPU (gloo) process group.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), str(ROOT / "tools" / "cache_latents.py"),
           "--pretrained_model_name_or_path", str(tiny_ckpt), "--train_data_dir", str(data), *DATA_ARGS]
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    result = run_script(cmd, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    counts = _counts(result.stdout, "latents")
    assert len(counts) == 2 and all(c > 0 for c, _ in counts)
    assert sum(c for c, _ in counts) == len(SIZES)  # each image computed once: shards are disjoint ...
    written = sorted((data / "2_sks shape").glob("*_sdxl.npz"))
    assert len(written) == len(SIZES)  # ... and complete
