"""sdxl_gen_img.py end to end on the tiny model: files, metadata, LoRA, textual inversion, errors."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from library.inference.png_metadata import read_generation_params, read_png_text
from tests.conftest import run_main

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "sdxl_gen_img.py"
FAST = ["--W", "64", "--H", "64", "--steps", "3", "--sampler", "euler"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    from tests.unit.test_pipeline import build_tiny

    return build_tiny(tmp_path_factory)


@pytest.fixture(scope="module")
def ckpt(tiny_dir) -> str:
    return str(tiny_dir / "tiny_sdxl.safetensors")


@pytest.fixture(scope="module")
def gen_main():
    """The script's ``main`` run in this process (faster than a subprocess for the many variants)."""
    spec = importlib.util.spec_from_file_location("sdxl_gen_img_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(np.int16)


def _run(gen_main, ckpt: str, outdir: Path, prompt: str, *extra: str) -> list[Path]:
    return gen_main(["--ckpt", ckpt, "--prompt", prompt, "--outdir", str(outdir), *FAST, *extra])


def test_cli_writes_png_with_round_tripping_metadata(ckpt, tmp_path):
    """A subprocess run from another folder: file name, size and the parameters read back."""
    outdir = tmp_path / "out"
    cmd = [sys.executable, str(SCRIPT), "--ckpt", ckpt, "--prompt", "a (red:1.2) cat --n blurry --d 123 --l 6",
           "--W", "64", "--H", "64", "--steps", "4", "--outdir", str(outdir), "--original_width", "128",
           "--crop_top", "8"]
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    files = list(outdir.glob("*.png"))
    assert len(files) == 1 and re.fullmatch(r"im_\d{14}_000_123\.png", files[0].name)
    assert Image.open(files[0]).size == (64, 64)
    params = read_generation_params(files[0])
    expected = {"prompt": "a (red:1.2) cat", "negative_prompt": "blurry", "seed": 123, "steps": 4, "scale": 6.0,
                "sampler": "ddim", "width": 64, "height": 64, "original_width": 128, "original_height": 64,
                "crop_top": 8, "crop_left": 0, "ckpt": "tiny_sdxl.safetensors",
                "raw_prompt": "a (red:1.2) cat --n blurry --d 123 --l 6"}
    assert {k: params.get(k) for k in expected} == expected
    text = read_png_text(files[0])  # sd-scripts' own keys are there too
    assert text["seed"] == "123" and text["negative-prompt"] == "blurry" and text["original-width"] == "128"
    assert not list(outdir.glob(".*.tmp"))  # written atomically: no temp files left


def test_cli_errors_are_one_line(tmp_path):
    """In-process through run_main (the script's own run_cli wrapper); the test above is the real launch."""
    result = run_main(SCRIPT.name, ["--ckpt", str(tmp_path / "missing.safetensors"), "--prompt", "a cat"])
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: --ckpt") and len(result.stderr.strip().splitlines()) == 1
    result = run_main(SCRIPT.name, ["--ckpt", str(SCRIPT), "--prompt", "a",
                                    "--network_regional_mask_max_color_codes", "3"])
    assert result.returncode == 2 and "not supported" in result.stderr


def test_from_file_batches_seeds_and_sequential_names(gen_main, ckpt, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# comment\na cat --d 1,2\na dog --w 72 --d 3\n", encoding="utf-8")
    outdir = tmp_path / "seq"
    written = gen_main(["--ckpt", ckpt, "--from_file", str(prompts), "--outdir", str(outdir), "--batch_size", "2",
                        "--sequential_file_name", *FAST])
    assert [p.name for p in written] == ["im_000001.png", "im_000002.png", "im_000003.png"]
    assert [read_generation_params(p)["seed"] for p in written] == [1, 2, 3]
    assert Image.open(written[2]).size == (72, 64)
    # batch of 2 == single image with the same seed
    single = _run(gen_main, ckpt, tmp_path / "single", "a cat --d 2")[0]
    assert np.abs(_pixels(single) - _pixels(written[1])).max() <= 1
    again = gen_main(["--ckpt", ckpt, "--prompt", "a cat", "--outdir", str(outdir), "--sequential_file_name", *FAST,
                      "--steps", "1"])
    assert [p.name for p in again] == ["im_000004.png"]  # numbering continues; nothing overwritten


def test_seed_gives_the_same_image(gen_main, ckpt, tmp_path):
    a = _run(gen_main, ckpt, tmp_path / "a", "a cat", "--seed", "99")
    b = _run(gen_main, ckpt, tmp_path / "b", "a cat", "--seed", "99")
    assert read_generation_params(a[0])["seed"] == 99
    assert np.array_equal(_pixels(a[0]), _pixels(b[0]))


@pytest.fixture(scope="module")
def lora_file(tiny_dir, tmp_path_factory) -> Path:
    """A LoRA for the tiny model with random non-zero weights (text encoders and U-Net)."""
    lora = pytest.importorskip("networks.lora", reason="networks/lora.py is not available")
    from library.models.checkpoint_io import load_sdxl

    models = load_sdxl(tiny_dir / "tiny_sdxl.safetensors")
    network = lora.create_network(1.0, 4, 2.0, models.vae, [models.text_encoder1, models.text_encoder2], models.unet)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in network.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    path = tmp_path_factory.mktemp("lora") / "test_lora.safetensors"
    network.save_weights(str(path))
    return path


def test_lora_changes_image_mul_zero_and_merge(gen_main, ckpt, lora_file, tmp_path):
    prompt = "a cat --d 7"
    base = _pixels(_run(gen_main, ckpt, tmp_path / "base", prompt)[0])
    lora = _run(gen_main, ckpt, tmp_path / "lora", prompt, "--network_module", "networks.lora",
                "--network_weights", str(lora_file), "--network_mul", "1.0")[0]
    with_lora = _pixels(lora)
    assert np.abs(with_lora - base).max() > 10
    params = read_generation_params(lora)
    assert params["network_weights"] == [lora_file.name] and params["network_multipliers"] == [1.0]
    zero = _pixels(_run(gen_main, ckpt, tmp_path / "zero", prompt, "--network_weights", str(lora_file),
                        "--network_mul", "0")[0])
    assert np.array_equal(zero, base)
    merged = _pixels(_run(gen_main, ckpt, tmp_path / "merged", prompt, "--network_weights", str(lora_file),
                          "--network_merge")[0])
    assert np.abs(merged - with_lora).max() <= 2  # same maths, weights summed first: uint8 rounding only
    # per-prompt --am overrides --network_mul for its prompt only: "--am 0" gives the base image,
    # the next prompt without --am is back at the --network_mul value
    prompts = tmp_path / "am.txt"
    prompts.write_text(f"{prompt} --am 0\n{prompt}\n", encoding="utf-8")
    am_zero, after = gen_main(["--ckpt", ckpt, "--from_file", str(prompts), "--outdir", str(tmp_path / "am"), *FAST,
                               "--network_weights", str(lora_file)])
    assert np.array_equal(_pixels(am_zero), base)
    assert np.array_equal(_pixels(after), with_lora)


def test_textual_inversion_embedding_by_file_stem(gen_main, ckpt, tiny_dir, tmp_path):
    """An embedding holding the vectors of "red" and "cat": "a myemb" must give the image of "a red cat"."""
    from safetensors.torch import save_file

    from library.models.checkpoint_io import load_sdxl
    from library.models.tokenizers import load_tokenizers

    models = load_sdxl(tiny_dir / "tiny_sdxl.safetensors")
    tokenizer = load_tokenizers()[0]
    ids = [tokenizer.convert_tokens_to_ids(w) for w in ("red</w>", "cat</w>")]
    vectors = {"clip_l": models.text_encoder1.get_input_embeddings().weight[ids].detach().clone(),
               "clip_g": models.text_encoder2.get_input_embeddings().weight[ids].detach().clone()}
    emb = tmp_path / "myemb.safetensors"
    save_file(vectors, str(emb))
    with_ti = _run(gen_main, ckpt, tmp_path / "ti", "a myemb --d 5", "--textual_inversion_embeddings", str(emb))[0]
    plain = _run(gen_main, ckpt, tmp_path / "plain", "a red cat --d 5")[0]
    other = _run(gen_main, ckpt, tmp_path / "other", "a myemb --d 5")[0]  # without the embedding: unknown word
    assert np.array_equal(_pixels(with_ti), _pixels(plain))
    assert not np.array_equal(_pixels(other), _pixels(plain))
    assert read_generation_params(with_ti)["textual_inversion_embeddings"] == ["myemb.safetensors"]


# ---- img2img, inpainting, highres fix, Deep Shrink (issue 14) ----------------------------------------------
def _png_with_prompt(path: Path, size, prompt: str, negative: str) -> None:
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("prompt", prompt)
    info.add_text("negative-prompt", negative)
    rng = np.random.default_rng(len(str(path)))
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path, pnginfo=info)


def test_img2img_folder_names_sizes_and_prompts_from_metadata(gen_main, ckpt, tmp_path):
    folder = tmp_path / "init"
    folder.mkdir()
    _png_with_prompt(folder / "a.png", (64, 64), "a red cat", "blurry")
    _png_with_prompt(folder / "b.png", (100, 70), "a dog", "")
    out = gen_main(["--ckpt", ckpt, "--prompt", "a fox --d 1,2", "--outdir", str(tmp_path / "o1"), "--steps", "3",
                    "--image_path", str(folder), "--strength", "0.5", "--use_original_file_name"])  # no --W/--H
    assert [p.name for p in out] == ["a.png", "b.png"]  # the images in turn, named after them
    assert Image.open(out[0]).size == (64, 64) and Image.open(out[1]).size == (96, 64)  # rounded down to /32
    params = read_generation_params(out[1])
    assert params["init_image"] == "b.png" and params["strength"] == 0.5 and params["prompt"] == "a fox"
    mask = tmp_path / "mask.png"
    Image.new("L", (64, 64), 255).save(mask)
    out = gen_main(["--ckpt", ckpt, "--outdir", str(tmp_path / "o2"), *FAST, "--image_path", str(folder / "a.png"),
                    "--mask_path", str(mask), "--seed", "4"])  # no prompt: read from the image
    params = read_generation_params(out[0])
    assert params["prompt"] == "a red cat" and params["negative_prompt"] == "blurry"
    assert params["mask_image"] == "mask.png" and params["strength"] == 0.8
    assert Image.open(out[0]).size == (64, 64)  # --W 64 --H 64 resized the image (and the mask) first


def test_highres_fix_with_lora_saves_both_stages(gen_main, ckpt, lora_file, tmp_path):
    hires = ["--W", "128", "--H", "128", "--highres_fix_scale", "0.5", "--highres_fix_steps", "2", "--steps", "2",
             "--sampler", "euler", "--highres_fix_save_1st"]
    common = ["--ckpt", ckpt, "--prompt", "a cat --d 3", *hires]
    out = gen_main([*common, "--outdir", str(tmp_path / "lora"), "--network_weights", str(lora_file)])
    assert len(out) == 2 and re.fullmatch(r"im_\d{14}_0000_3\.png", out[0].name)
    assert re.fullmatch(r"im_\d{14}_1000_3\.png", out[1].name)
    assert Image.open(out[0]).size == (64, 64) and Image.open(out[1]).size == (128, 128)
    params = [read_generation_params(p) for p in out]
    assert params[0]["steps"] == 2 and params[0]["highres_fix_stage"] == 1 and params[1]["seed"] == 3
    assert params[1]["highres_fix_scale"] == 0.5 and params[1]["network_weights"] == [lora_file.name]
    base = gen_main([*common, "--outdir", str(tmp_path / "base")])
    assert np.abs(_pixels(base[1]) - _pixels(out[1])).max() > 10  # the LoRA acts in both stages


def test_deep_shrink_prompt_option_applies_to_its_prompt_only(gen_main, ckpt, tmp_path):
    prompts = tmp_path / "ds.txt"
    prompts.write_text("a cat --d 7 --dsd1 3 --dst1 0\na cat --d 7\n", encoding="utf-8")
    shrunk, after = gen_main(["--ckpt", ckpt, "--from_file", str(prompts), "--outdir", str(tmp_path / "ds"), *FAST])
    base = _run(gen_main, ckpt, tmp_path / "base", "a cat --d 7")[0]
    assert np.array_equal(_pixels(after), _pixels(base))
    assert np.abs(_pixels(shrunk) - _pixels(base)).max() > 10
    assert read_generation_params(shrunk)["deep_shrink"]["depth_1"] == 3


def test_interactive_reads_prompts_until_end_of_input(gen_main, ckpt, tmp_path, monkeypatch):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("\na cat --d 5\na dog --s many\na dog --d 6 --n blurry\n"))
    out = gen_main(["--ckpt", ckpt, "--interactive", "--outdir", str(tmp_path / "i"), *FAST])
    assert [read_generation_params(p)["seed"] for p in out] == [5, 6]  # the bad line is reported and skipped
    assert read_generation_params(out[1])["negative_prompt"] == "blurry"
