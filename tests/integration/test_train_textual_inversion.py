"""sdxl_train_textual_inversion.py on the tiny model, on the CPU: one real launch, the rest in-process."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from library.errors import run_cli
from tests.conftest import ROOT, run_script

pytestmark = pytest.mark.slow

BUCKETS = ["--resolution", "64", "--enable_bucket", "--min_bucket_reso", "32", "--max_bucket_reso", "128",
           "--bucket_reso_steps", "32"]


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """One intra-op thread; and a fresh accelerate state per test (in-process runs differ in precision)."""
    from accelerate.state import AcceleratorState

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    torch.set_num_threads(threads)


@pytest.fixture()
def dataset(tiny_model_dir, tmp_path) -> Path:
    """A private copy of the tiny DreamBooth folder ``10_sks shape`` (captions "sks <shape>, plain background")."""
    dst = tmp_path / "train"
    shutil.copytree(tiny_model_dir / "train", dst)
    return dst


def ti_args(ckpt: Path, data: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return ["--pretrained_model_name_or_path", str(ckpt), "--train_data_dir", str(data), *BUCKETS,
            "--output_dir", str(out), "--output_name", "sks", "--token_string", "sks", "--init_word", "circle",
            "--num_vectors_per_token", "2", "--learning_rate", "5e-3", "--max_train_steps", str(steps),
            "--train_batch_size", "1", "--seed", "1", "--max_data_loader_n_workers", "0", "--cache_latents",
            "--log_every_n_steps", "1", *extra]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_under_test", ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def ti_main():
    return load_script("sdxl_train_textual_inversion").main


def build_trainer(argv: list[str]):
    """The steps of ``train_main`` + ``run_training`` up to a set-up Trainer (so a test can inspect the run)."""
    from library.config.args import build_trainer_parser
    from library.config.schema import validate_training_args
    from library.training.cli import build_data
    from library.training.config import TrainConfig
    from library.training.setup import create_run, fill_caches, place_frozen_models
    from library.training.trainer import Trainer

    ns = build_trainer_parser("train_textual_inversion").parse_args(argv)
    validate_training_args(ns, "train_textual_inversion")
    cfg = TrainConfig.from_namespace(ns)
    data = build_data(ns, cfg)
    method = load_script("sdxl_train_textual_inversion").make_method(ns, cfg)
    method.check_data(data)
    run = create_run(cfg, data)
    fill_caches(run, run.encode_text)
    place_frozen_models(run, method.unet_weights_trained, method.text_encoder_weights_trained)
    trainer = Trainer(run, method)
    trainer.setup()
    return trainer, method, run


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


# ---------------------------------------------------------------------------------------------
def test_end_to_end_under_accelerate_launch(tiny_ckpt, dataset, tmp_path):
    """Caption mode, 2 vectors, safetensors, a periodic save and a sample image made with the embedding."""
    out = tmp_path / "out"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("sks shape --w 64 --h 64 --s 2 --d 3\n", encoding="utf-8")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--cpu", "sdxl_train_textual_inversion.py",
           *ti_args(tiny_ckpt, dataset, out, 6, "--save_model_as", "safetensors", "--save_every_n_steps", "3",
                    "--sample_prompts", str(prompts), "--sample_every_n_steps", "6", "--training_comment", "ci")]
    r = run_script(cmd)
    assert r.returncode == 0, r.stderr[-3000:]
    final, periodic = out / "sks.safetensors", out / "sks-step00000003.safetensors"
    assert final.is_file() and periodic.is_file()
    state = load_file(final)
    assert set(state) == {"clip_l", "clip_g"}
    assert state["clip_l"].shape == (2, 64) and state["clip_g"].shape == (2, 128)  # the tiny encoders' widths
    assert state["clip_l"].dtype == torch.float32
    assert not torch.equal(state["clip_l"], load_file(periodic)["clip_l"])  # it kept learning
    with safe_open(str(final), "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/textual-inversion"
    assert meta["ss_token_string"] == "sks" and meta["ss_num_vectors_per_token"] == "2"
    assert meta["ss_steps"] == "6" and meta["ss_training_comment"] == "ci" and "sshs_model_hash" in meta
    assert len(list((out / "sample").glob("sks_000006_00_*_3.png"))) == 1


def test_templates_pt_default_and_resume_is_exact(ti_main, tiny_ckpt, dataset, tmp_path):
    """Template mode (captions ignored) saves the default .pt; 4 steps == 2 steps + --resume to 4, bit for bit."""
    template = ["--use_object_template", "--gradient_accumulation_steps", "1"]
    ti_main(ti_args(tiny_ckpt, dataset, tmp_path / "a", 4, *template))
    ti_main(ti_args(tiny_ckpt, dataset, tmp_path / "b", 4, *template, "--save_every_n_steps", "2", "--save_state"))
    state_dir = tmp_path / "b" / "sks-step00000002-state"
    assert (state_dir / "train_state.json").is_file()
    ti_main(ti_args(tiny_ckpt, dataset, tmp_path / "c", 4, *template, "--resume", str(state_dir)))
    a, b, c = (torch.load(tmp_path / d / "sks.pt", weights_only=True) for d in "abc")
    assert set(a) == {"clip_l", "clip_g"}
    for key in a:
        assert torch.equal(a[key], b[key]) and torch.equal(a[key], c[key]), key
    half = torch.load(tmp_path / "b" / "sks-step00000002.pt", weights_only=True)
    assert not torch.equal(half["clip_l"], a["clip_l"])


@pytest.fixture()
def listening_ckpt(tiny_ckpt, tmp_path) -> Path:
    """The tiny model with its cross-attention outputs scaled up (x100, transformer proj_out x3).

    The random tiny U-Net barely depends on its text (any context changes its loss by ~1%), so no
    embedding could lower the loss much; scaled like this its prediction depends on the prompt, as a
    trained SDXL's does.
    """
    from safetensors.torch import save_file

    state = load_file(tiny_ckpt)
    for key in state:
        if "attn2.to_out.0.weight" in key:
            state[key] = state[key] * 100
        elif "proj_out" in key and key.endswith("weight"):
            state[key] = state[key] * 3
    path = tmp_path / "listening.safetensors"
    save_file(state, str(path))
    return path


def test_learning_is_real_and_only_the_new_rows_change(listening_ckpt, dataset, tmp_path):
    """With fixed noise and timesteps the loss falls; every other row and every other weight is untouched;
    generation with the trained embedding differs from the init word's; a prompt without it is unchanged."""
    tiny_ckpt = listening_ckpt
    from library.inference import pipeline as pl
    from library.models.checkpoint_io import load_sdxl
    from library.models.embedding_file import write_embedding
    from library.models.tokenizers import load_tokenizers

    out = tmp_path / "learn"
    trainer, method, run = build_trainer(ti_args(tiny_ckpt, dataset, out, 16, "--save_model_as", "safetensors",
                                                 "--learning_rate", "6e-2"))
    start = [v.detach().clone() for v in (method.vectors.clip_l, method.vectors.clip_g)]

    def fixed_loss() -> float:
        gen, total = torch.Generator().manual_seed(0), 0.0
        with torch.no_grad():
            for batch in _training_batches(run):
                latents = batch["latents"] * 0.13025
                context, pooled = run.conditioner.encode(method.training_captions(batch["captions"]))
                size = torch.cat([batch["original_sizes_hw"], batch["crop_top_lefts"],
                                  batch["target_sizes_hw"]], dim=-1).float()
                for t in (200, 500, 800):
                    eps = torch.randn(latents.shape, generator=gen)
                    a = run.scheduler.alphas_cumprod[t]
                    noisy = a.sqrt() * latents + (1 - a).sqrt() * eps
                    pred = run.models.unet(noisy, torch.tensor([t]), context,
                                           added_cond_kwargs={"text_embeds": pooled, "time_ids": size}).sample
                    total += torch.nn.functional.mse_loss(pred, eps).item()
        return total

    before = fixed_loss()
    saved = trainer.train()
    after = fixed_loss()
    assert after < 0.97 * before, (before, after)  # 26.91 -> 25.62 on the CPU (deterministic)

    fresh = load_sdxl(tiny_ckpt)
    vocab = len(load_tokenizers()[0])
    for name in ("text_encoder1", "text_encoder2"):
        trained, original = getattr(run.models, name), getattr(fresh, name)
        table, base = trained.get_input_embeddings().weight, original.get_input_embeddings().weight
        assert table.shape[0] == vocab + 2 and torch.equal(table[:vocab], base), name  # every old row, bit for bit
        t_state, o_state = trained.state_dict(), original.state_dict()
        for key, value in o_state.items():
            if "token_embedding" not in key:
                assert torch.equal(t_state[key], value), (name, key)
    unet_state = run.models.unet.state_dict()
    assert all(torch.equal(unet_state[key], value) for key, value in fresh.unet.state_dict().items())

    init_file = tmp_path / "sks.pt"  # the init word's vectors under the same trigger, for comparison
    write_embedding(init_file, *start)

    def image(prompt: str, embedding: Path | None) -> np.ndarray:
        models, tokenizers = load_sdxl(tiny_ckpt), list(load_tokenizers())
        g = pl.SDXLGenerator.from_models(models, tokenizers, dtype=torch.float32, device="cpu")
        if embedding is not None:
            trigger, tokens = pl.load_textual_inversion(embedding, tokenizers, [models.text_encoder1,
                                                                                models.text_encoder2])
            g.token_replacements[trigger] = " ".join(tokens)
        return g.generate([prompt], width=64, height=64, steps=2, sampler="euler", seeds=[5], output_type="np")

    trained_image, init_image = image("a sks shape", saved), image("a sks shape", init_file)
    assert not np.array_equal(trained_image, init_image)
    assert np.array_equal(image("a red circle", saved), image("a red circle", None))


def _training_batches(run):
    """Each training image once (batch size 1, from the latent cache)."""
    seen, data = set(), run.data
    data.set_epoch(0)
    for i in range(len(data)):
        batch = data[i]
        if batch["image_paths"][0] not in seen:
            seen.add(batch["image_paths"][0])
            yield batch


def test_diffusers_load_textual_inversion_reproduces_our_prompt_embeddings(tiny_ckpt, tiny_diffusers, dataset,
                                                                           tmp_path):
    """Our saved file through diffusers' loader (once per encoder) == the training-time encoding == sdxl_gen_img's."""
    from diffusers import StableDiffusionXLPipeline

    from library.inference import pipeline as pl
    from library.models.checkpoint_io import load_sdxl
    from library.models.tokenizers import load_tokenizers

    trainer, method, run = build_trainer(ti_args(tiny_ckpt, dataset, tmp_path / "o", 3, "--save_model_as",
                                                 "safetensors"))
    path = trainer.train()
    prompt = "a photo of sks shape"
    with torch.no_grad():
        ours_ctx, ours_pooled = run.conditioner.encode(method.training_captions([prompt]))

        pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_diffusers), dtype=torch.float32)
        state = load_file(path)
        pipe.load_textual_inversion(state["clip_l"], token="sks", text_encoder=pipe.text_encoder,
                                    tokenizer=pipe.tokenizer)
        pipe.load_textual_inversion(state["clip_g"], token="sks", text_encoder=pipe.text_encoder_2,
                                    tokenizer=pipe.tokenizer_2)
        ctx, _, pooled, _ = pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=1,
                                               do_classifier_free_guidance=False)
        assert torch.allclose(ctx, ours_ctx, atol=1e-5) and torch.allclose(pooled, ours_pooled, atol=1e-5)

        models, tokenizers = load_sdxl(tiny_ckpt), list(load_tokenizers())
        g = pl.SDXLGenerator.from_models(models, tokenizers, dtype=torch.float32, device="cpu")
        trigger, tokens = pl.load_textual_inversion(path, tokenizers, [models.text_encoder1, models.text_encoder2])
        assert trigger == "sks" and tokens == ["sks", "sks1"]
        g.token_replacements[trigger] = " ".join(tokens)
        gen_ctx, gen_pooled = g.encode_prompts([prompt])  # the generator expands the trigger itself
        assert torch.allclose(gen_ctx, ours_ctx, atol=1e-5) and torch.allclose(gen_pooled, ours_pooled, atol=1e-5)


def test_gen_img_loads_ours_and_sd_scripts_files_at_once(tiny_ckpt, tmp_path):
    """sdxl_gen_img.py --textual_inversion_embeddings a.safetensors b.pt: both triggers work in one prompt, and a
    file in sd-scripts' layout (torch pickle of clip_l/clip_g) equals our safetensors of the same vectors."""
    from library.models.embedding_file import write_embedding

    gen_main = load_script("sdxl_gen_img").main
    g = torch.Generator().manual_seed(3)
    ours = write_embedding(tmp_path / "ours.safetensors", torch.randn(2, 64, generator=g),
                           torch.randn(2, 128, generator=g), metadata={"modelspec.title": "ours"})
    theirs = tmp_path / "theirs.pt"
    torch.save({"clip_l": torch.randn(1, 64, generator=g), "clip_g": torch.randn(1, 128, generator=g)}, theirs)
    same = tmp_path / "same.safetensors"
    write_embedding(same, *(torch.load(theirs, weights_only=True)[k] for k in ("clip_l", "clip_g")))
    fast = ["--ckpt", str(tiny_ckpt), "--W", "64", "--H", "64", "--steps", "2", "--sampler", "euler"]

    def run(prompt: str, outdir: str, *files: Path) -> np.ndarray:
        extra = ["--textual_inversion_embeddings", *map(str, files)] if files else []
        return pixels(gen_main([*fast, "--prompt", prompt + " --d 4", "--outdir", str(tmp_path / outdir), *extra])[0])

    both = run("ours and theirs", "both", ours, theirs)
    assert not np.array_equal(both, run("ours and theirs", "none"))
    assert np.array_equal(run("a theirs", "pt", theirs), run("a same", "st", same))
    assert np.array_equal(run("a plain shape", "plain_ti", ours, theirs), run("a plain shape", "plain"))


# ---------------------------------------------------------------------------------------------
def _captions_without_token(folder: Path, count: int) -> Path:
    sub = folder / "1_thing"
    sub.mkdir(parents=True)
    for i in range(count):
        Image.new("RGB", (64, 64), (i * 10, 80, 120)).save(sub / f"x{i:02d}.png")
        (sub / f"x{i:02d}.caption").write_text("a blue square" if i else "sks square", encoding="utf-8")
    return folder


@pytest.mark.parametrize("extra, expected", [
    (["--cache_text_encoder_outputs"], "--cache_text_encoder_outputs cannot be used for textual inversion"),
    (["--cache_text_encoder_outputs_to_disk"], "--cache_text_encoder_outputs cannot be used for textual inversion"),
    (["--token_string", "a"], "'a' is already in the tokenizer vocabulary"),
    (["--token_string", "my token"], "give one word without spaces"),
    (["--use_object_template", "--use_style_template"], "cannot be used together"),
    (["--num_vectors_per_token", "0"], "--num_vectors_per_token must be at least 1"),
    (["--weights", "missing.safetensors"], "--weights: file not found: missing.safetensors"),
    (["--weights", "WRONG_N"], "holds 3 vector(s) but --num_vectors_per_token is 2"),
    (["--weights", "NOT_SDXL"], "is not an SDXL embedding"),
    (["--token_string", ""], "--token_string is required"),
    ([], "is missing from the caption of 11 training image(s)"),
])
def test_bad_input_is_one_line_and_writes_nothing(ti_main, tmp_path, capsys, extra, expected):
    """Checked before any model loads: the "model" here is not even a model file."""
    fake_model = tmp_path / "model.safetensors"
    fake_model.write_bytes(b"not a model")
    data = _captions_without_token(tmp_path / "data", 12) if not extra else tmp_path / "data"
    if extra:
        _captions_without_token(data, 1)
    files = {"WRONG_N": tmp_path / "n3.pt", "NOT_SDXL": tmp_path / "sd1.pt"}
    torch.save({"clip_l": torch.zeros(3, 64), "clip_g": torch.zeros(3, 128)}, files["WRONG_N"])
    torch.save({"string_to_param": {"*": torch.zeros(1, 768)}}, files["NOT_SDXL"])
    extra = [str(files.get(e, e)) for e in extra]
    out = tmp_path / "out"
    argv = ti_args(fake_model, data, out, 2, *extra)
    with pytest.raises(SystemExit) as exc:
        run_cli(lambda: ti_main(argv))
    assert exc.value.code == 2
    stderr = capsys.readouterr().err
    err = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and expected in err[0] and "Traceback" not in stderr, stderr
    if not extra:
        assert "x01.png" in err[0] and "and 1 more" in err[0] and "x00.png" not in err[0]
    assert not out.exists()



def test_bf16_checkpointing_and_weights_keep_everything_else_frozen_in_bf16(tiny_ckpt, dataset, tmp_path):
    """--mixed_precision bf16 --gradient_checkpointing --weights: the run starts from the file's vectors, trains
    them in fp32, and both encoders (all old rows too), the U-Net and the VAE stay bf16 and unchanged."""
    from library.models.checkpoint_io import load_sdxl
    from library.models.embedding_file import write_embedding

    g = torch.Generator().manual_seed(1)
    start = tmp_path / "start.safetensors"
    write_embedding(start, torch.randn(2, 64, generator=g) * 0.1, torch.randn(2, 128, generator=g) * 0.1)
    trainer, method, run = build_trainer(ti_args(tiny_ckpt, dataset, tmp_path / "o", 3, "--mixed_precision", "bf16",
                                                 "--gradient_checkpointing", "--weights", str(start)))
    assert torch.equal(method.vectors.clip_l.detach(), load_file(start)["clip_l"])
    assert run.prompt_replacements == {"sks": "sks sks1"}  # sample prompts say the token string
    assert run.conditioner.tokenizer2.convert_tokens_to_ids("sks1") == 49409  # the sampler's tokenizers know it
    before = {name: {k: v.clone() for k, v in getattr(run.models, name).state_dict().items()}
              for name in ("unet", "text_encoder1", "text_encoder2")}
    path = trainer.train()
    assert method.vectors.clip_l.dtype == torch.float32 and not torch.equal(method.vectors.clip_l.detach(),
                                                                            load_file(start)["clip_l"])
    fresh = load_sdxl(tiny_ckpt)
    for name, states in before.items():
        module = getattr(run.models, name)
        assert {p.dtype for p in module.parameters()} == {torch.bfloat16}, name
        now = module.state_dict()
        assert all(torch.equal(now[k], v) for k, v in states.items()), name
    for name in ("text_encoder1", "text_encoder2"):
        old = getattr(fresh, name).get_input_embeddings().weight
        table = getattr(run.models, name).get_input_embeddings().weight
        assert torch.equal(table[:old.shape[0]], old.to(torch.bfloat16)), name
    assert path.suffix == ".pt" and torch.load(path, weights_only=True)["clip_g"].shape == (2, 128)
