"""SDXLGenerator against diffusers' StableDiffusionXLPipeline (the oracle), weighting, seeds, hooks, planning.

Oracle tolerance: images are compared as float arrays in [0, 1] (``output_type="np"``) on CPU in
fp32; the largest absolute difference allowed is 1e-4 (observed ~2e-6: the two run the same
arithmetic, only the order of a few batched operations differs).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch

from library.diffusion.conditioning import TextConditioner
from library.errors import UserError
from library.inference import gen_args as ga
from library.inference import pipeline as pl
from library.inference.prompts import PromptSpec
from library.text.weighting import apply_token_weights, encode_weighted_prompt

ORACLE_TOL = 1e-4
SIZE = 64
STEPS = 4


def build_tiny(tmp_path_factory) -> Path:
    """Write the tiny model once per test session (shared by every module that asks)."""
    folder = tmp_path_factory.getbasetemp() / "tiny_sdxl_shared"
    if not (folder / "tiny_sdxl_diffusers" / "model_index.json").is_file():
        from tools.make_tiny_sdxl import main as make_tiny

        make_tiny([str(folder), "--images", "0"])
    return folder


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return build_tiny(tmp_path_factory)


@pytest.fixture(scope="module")
def generator(tiny_dir) -> pl.SDXLGenerator:
    from library.models.checkpoint_io import load_sdxl
    from library.models.tokenizers import load_tokenizers

    models = load_sdxl(tiny_dir / "tiny_sdxl.safetensors")
    return pl.SDXLGenerator.from_models(models, load_tokenizers())


@pytest.fixture(scope="module")
def diffusers_pipe(tiny_dir):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_dir / "tiny_sdxl_diffusers"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generators(seeds):
    return [torch.Generator("cpu").manual_seed(s) for s in seeds]


# ---- the oracle -------------------------------------------------------------------------------------
@pytest.mark.parametrize("sampler", ["euler", "euler_a", "ddim", "dpm++_2m_karras"])
def test_matches_diffusers_pipeline(generator, diffusers_pipe, sampler):
    """Same prompts, seeds, sampler and steps: our image equals diffusers' (empty negative = zeros)."""
    from library.inference.samplers import make_sampler

    prompts, seeds = ["a photo of a cat", "a red dog on grass"], [11, 12]
    ours = generator.generate(prompts, None, width=SIZE, height=SIZE, steps=STEPS, guidance_scale=5.0,
                              sampler=sampler, seeds=seeds, output_type="np")
    diffusers_pipe.scheduler = make_sampler(sampler)
    # diffusers draws the initial noise from the same per-image CPU generators, which then feed
    # the ancestral sampler's noise: nothing else is shared
    theirs = diffusers_pipe(prompts, width=SIZE, height=SIZE, num_inference_steps=STEPS, guidance_scale=5.0,
                            generator=_generators(seeds), output_type="np").images
    assert ours.shape == theirs.shape == (2, SIZE, SIZE, 3)
    assert np.abs(ours - theirs).max() < ORACLE_TOL
    assert ours.std() > 0.01  # a real image, not a constant


def test_matches_diffusers_with_negatives_sizes_and_latents(generator, diffusers_pipe):
    """Given latents, negative prompts and micro-conditioning sizes are passed the same way as diffusers'."""
    from library.inference.samplers import make_sampler

    latents = torch.randn((2, 4, SIZE // 8, SIZE // 8), generator=torch.Generator().manual_seed(3))
    common = dict(width=SIZE, height=SIZE, guidance_scale=6.0, output_type="np", original_size=(96, 128),
                  target_size=(64, 64))
    ours = generator.generate(["a cat", "a dog"], ["blurry", "lowres, ugly"], steps=2, sampler="ddim", seeds=[1, 2],
                              latents=latents, crop_top_left=(8, 16), **common)
    diffusers_pipe.scheduler = make_sampler("ddim")
    theirs = diffusers_pipe(["a cat", "a dog"], negative_prompt=["blurry", "lowres, ugly"], num_inference_steps=2,
                            latents=latents.clone(), crops_coords_top_left=(8, 16), **common).images
    assert np.abs(ours - theirs).max() < ORACLE_TOL
    plain = generator.generate(["a cat", "a dog"], ["blurry", "lowres, ugly"], width=SIZE, height=SIZE, steps=2,
                               guidance_scale=6.0, sampler="ddim", seeds=[1, 2], latents=latents, output_type="np")
    assert np.abs(ours - plain).max() > 1e-3  # the size conditioning does reach the U-Net

    # a separate negative original size; one image only, because diffusers 0.42 tiles the time ids of a
    # batch as [neg, pos, neg, pos] against embeddings ordered [neg, neg, pos, pos] (its bug, not ours)
    ours = generator.generate(["a cat"], None, steps=2, sampler="ddim", seeds=[1], latents=latents[:1],
                              negative_original_size=(32, 48), **common)
    theirs = diffusers_pipe(["a cat"], num_inference_steps=2, latents=latents[:1].clone(),
                            negative_original_size=(32, 48), negative_target_size=(64, 64), **common).images
    assert np.abs(ours - theirs).max() < ORACLE_TOL


def test_same_seed_same_image_and_batch_invariance(generator):
    """A seed gives the same image twice, and the same image alone or in a batch (ancestral sampler)."""
    kwargs = dict(width=SIZE, height=SIZE, steps=2, guidance_scale=4.0, sampler="euler_a", output_type="np")
    first = generator.generate(["a cat"], seeds=[7], **kwargs)
    again = generator.generate(["a cat"], seeds=[7], **kwargs)
    assert np.array_equal(first, again)
    batch = generator.generate(["a red dog", "a cat"], seeds=[5, 7], **kwargs)
    alone = generator.generate(["a red dog"], seeds=[5], **kwargs)
    assert np.abs(batch[1:] - first).max() < 1e-5
    assert np.abs(batch[:1] - alone).max() < 1e-5
    other = generator.generate(["a cat"], seeds=[8], **kwargs)
    assert np.abs(other - first).max() > 1e-3


def test_negative_scale_zero_equals_plain_guidance(generator):
    """With --negative_scale 0 the negative prompt drops out: CFG against the empty (zero) prompt."""
    kwargs = dict(width=SIZE, height=SIZE, steps=2, guidance_scale=5.0, sampler="euler", seeds=[4],
                  output_type="np")
    plain = generator.generate(["a cat"], [""], **kwargs)
    zero_neg = generator.generate(["a cat"], ["blurry"], negative_scale=0.0, **kwargs)
    with_neg = generator.generate(["a cat"], ["blurry"], negative_scale=3.0, **kwargs)
    assert np.abs(plain - zero_neg).max() < 1e-5
    assert np.abs(plain - with_neg).max() > 1e-3


def test_no_guidance_and_latent_output(generator):
    latents = generator.generate(["a cat"], width=SIZE, height=SIZE, steps=2, guidance_scale=1.0, sampler="euler",
                                 seeds=[1], output_type="latent")
    assert latents.shape == (1, 4, SIZE // 8, SIZE // 8) and latents.dtype == torch.float32
    images = generator.generate(["a cat"], width=SIZE, height=SIZE, steps=2, guidance_scale=1.0, sampler="euler",
                                seeds=[1])
    assert images[0].size == (SIZE, SIZE) and images[0].mode == "RGB"
    # the 8-bit pixels are the float image rounded, exactly as numpy rounds it
    array = generator.decode(latents, "np")
    expected = (array * 255).round().astype("uint8")
    assert np.array_equal(np.asarray(generator.decode(latents)[0]), expected[0])


def test_empty_negative_prompt_gives_zero_conditioning(generator):
    context, pooled = generator.conditioning(["a cat", "a dog"], ["", "blurry"], copies=2, max_embeddings_multiples=3)
    assert context.shape[0] == 4 and pooled.shape[0] == 4
    assert torch.count_nonzero(context[0]) == 0 and torch.count_nonzero(pooled[0]) == 0
    assert torch.count_nonzero(context[1]) > 0 and torch.count_nonzero(pooled[1]) > 0


def test_long_prompts_use_more_windows(generator):
    short, _ = generator.encode_prompts(["a cat"], max_embeddings_multiples=3)
    long_prompt = ", ".join(["a red cat on a green sofa"] * 15)  # 119 tokens
    long, _ = generator.encode_prompts([long_prompt], max_embeddings_multiples=3)
    capped, _ = generator.encode_prompts([long_prompt], max_embeddings_multiples=1)
    assert short.shape[1] == 77 and long.shape[1] == 152 and capped.shape[1] == 77
    both, _ = generator.encode_prompts(["a cat"], max_embeddings_multiples=3, also_fit=[long_prompt])
    assert both.shape[1] == 152


def test_unet_hooks_are_called_every_step(generator):
    seen = []

    def hook(step: pl.DenoiseStep):
        seen.append((step.index, step.num_calls, step.batch_size, step.guidance_copies, tuple(step.latent_input.shape)))
        return None

    generator.unet_hooks.append(hook)
    try:
        generator.generate(["a cat"], width=SIZE, height=SIZE, steps=3, guidance_scale=5.0, sampler="heun", seeds=[1],
                           output_type="latent")
    finally:
        generator.unet_hooks.remove(hook)
    assert [s[0] for s in seen] == list(range(len(seen))) and len(seen) == seen[0][1] == 5  # Heun: 2*3-1 calls
    assert seen[0][2:] == (1, 2, (2, 4, SIZE // 8, SIZE // 8))


def test_bad_inputs(generator):
    with pytest.raises(UserError):
        generator.generate(["a"], width=60, height=64, steps=1)
    with pytest.raises(ValueError):
        generator.generate(["a", "b"], seeds=[1], width=64, height=64, steps=1)


def test_fp16_decodes_vae_in_fp32(tiny_dir):
    from library.models.presets import build_random

    models = build_random("tiny", meta=False)
    gen = pl.SDXLGenerator.from_models(models, (None, None), dtype=torch.float16)
    assert gen.vae_dtype == torch.float32 and next(gen.unet.parameters()).dtype == torch.float16
    gen = pl.SDXLGenerator.from_models(models, (None, None), dtype=torch.bfloat16, no_half_vae=True)
    assert gen.vae_dtype == torch.float32


# ---- weighting ------------------------------------------------------------------------------------
@pytest.mark.parametrize("max_token_length", [None, 150, 225])
def test_weighted_prompt_with_unit_weights_equals_unweighted(generator, max_token_length):
    tok, te = generator.tokenizers, generator.text_encoders
    cond = TextConditioner(tok[0], tok[1], te[0], te[1], max_token_length)
    plain = ["a photo of a cat", "", ", ".join(["a dog on grass"] * 30)]
    weighted = ["(a photo:1.0) of a cat", "", ", ".join(["a dog on grass"] * 30)]
    with torch.no_grad():
        c1, p1 = cond.encode(plain)
        c2, p2 = encode_weighted_prompt(tok, te, weighted, max_token_length)
    assert torch.equal(c1, c2) and torch.equal(p1, p2)


def test_weights_change_context_keep_mean_and_pooled(generator):
    tok, te = generator.tokenizers, generator.text_encoders
    with torch.no_grad():
        c1, p1 = encode_weighted_prompt(tok, te, ["a cat on a sofa"])
        c2, p2 = encode_weighted_prompt(tok, te, ["a (cat:1.5) on a [sofa]"])
    assert torch.equal(p1, p2)
    assert (c1 - c2).abs().max() > 1e-3
    for part in (slice(0, 64), slice(64, None)):  # tiny TE1 width 64, TE2 width 128: each mean is kept
        assert torch.allclose(c1[..., part].mean(), c2[..., part].mean(), atol=1e-5)


def test_apply_token_weights_rescales_per_sample():
    hidden = torch.randn(2, 5, 3) + 1.0
    weights = torch.tensor([[1.0, 2.0, 1.0, 1.0, 1.0], [1.0] * 5])
    out = apply_token_weights(hidden, weights)
    assert torch.allclose(out.mean(dim=(1, 2)), hidden.mean(dim=(1, 2)), atol=1e-5)
    assert torch.equal(out[1], hidden[1])
    assert apply_token_weights(hidden, torch.ones(2, 5)) is hidden


def test_weighted_prompt_has_gradients(generator):
    tok, te = generator.tokenizers, generator.text_encoders
    emb = te[0].get_input_embeddings().weight
    emb.requires_grad_(True)
    try:
        context, _ = encode_weighted_prompt(tok, te, ["a (cat:1.2)"])
        context.sum().backward()
        assert emb.grad is not None and emb.grad.abs().sum() > 0
    finally:
        emb.requires_grad_(False)
        emb.grad = None


# ---- textual inversion ------------------------------------------------------------------------------
def test_textual_inversion_trigger_expands_to_its_vectors(tiny_dir, tmp_path):
    from safetensors.torch import save_file

    from library.models.checkpoint_io import load_sdxl
    from library.models.tokenizers import load_tokenizers

    models = load_sdxl(tiny_dir / "tiny_sdxl.safetensors")
    tokenizers = load_tokenizers()
    tes = [models.text_encoder1, models.text_encoder2]
    ids = [tokenizers[0].convert_tokens_to_ids(w) for w in ("red</w>", "cat</w>")]
    vectors = {name: te.get_input_embeddings().weight[ids].detach().clone()
               for name, te in zip(("clip_l", "clip_g"), tes)}
    save_file(vectors, str(tmp_path / "mytoken.safetensors"))
    trigger, tokens = pl.load_textual_inversion(tmp_path / "mytoken.safetensors", tokenizers, tes)
    assert trigger == "mytoken" and tokens == ["mytoken", "mytoken1"]
    gen = pl.SDXLGenerator.from_models(models, tokenizers)
    gen.token_replacements[trigger] = " ".join(tokens)
    with torch.no_grad():
        a, pa = gen.encode_prompts(["a mytoken on a sofa"])
        b, pb = gen.encode_prompts(["a red cat on a sofa"])
    assert torch.equal(a, b) and torch.equal(pa, pb)
    with pytest.raises(UserError, match="already in the vocabulary"):
        pl.load_textual_inversion(tmp_path / "mytoken.safetensors", tokenizers, tes)
    save_file({"clip_l": vectors["clip_l"]}, str(tmp_path / "broken.safetensors"))
    with pytest.raises(UserError, match="clip_g"):
        pl.load_textual_inversion(tmp_path / "broken.safetensors", tokenizers, tes)


# ---- planning, names --------------------------------------------------------------------------------
def _spec(prompt: str, **kw) -> PromptSpec:
    from library.inference.prompts import parse_prompt_line

    return parse_prompt_line(prompt).with_defaults(width=64, height=64, steps=2, **kw)


def test_plan_jobs_seeds():
    jobs = ga.plan_jobs([_spec("a cat"), _spec("a dog --d 5,6,7")], images_per_prompt=2, n_iter=2, seed=42)
    seeds = [j.seed for j in jobs]
    assert seeds[0] == 42 and len(seeds) == 2 * (2 + 3)
    assert seeds[2:5] == [5, 6, 7] and seeds[7:10] == [5, 6, 7]
    assert len(set(seeds[:2] + seeds[5:7])) == 4  # iterations continue the stream
    same = ga.plan_jobs([_spec("a cat")], images_per_prompt=2, n_iter=3, seed=42, iter_same_seed=True)
    assert [j.seed for j in same] == [42, same[1].seed] * 3
    assert [j.seed for j in ga.plan_jobs([_spec("a cat")], 3, seed=42)] == [j.seed for j in
                                                                           ga.plan_jobs([_spec("a cat")], 3, seed=42)]


def test_plan_jobs_dynamic_prompts():
    jobs = ga.plan_jobs([_spec("a {e$$red|blue} cat --n {e$$ugly}")], images_per_prompt=5, seed=1)
    assert [j.spec.prompt for j in jobs] == ["a red cat", "a blue cat"]
    assert all(j.spec.negative_prompt == "ugly" for j in jobs)
    jobs = ga.plan_jobs([_spec("a {red|blue|green|pink} cat")], images_per_prompt=12, seed=1)
    assert len(jobs) == 12 and len({j.spec.prompt for j in jobs}) > 1


def test_batches_group_equal_settings():
    specs = [_spec("a"), _spec("b"), _spec("c --w 128"), _spec("d --w 128"), _spec("e"), _spec("f --am 0.5")]
    jobs = ga.plan_jobs(specs, seed=0)
    groups = [[j.spec.prompt for j in b] for b in ga.batches(jobs, 2)]
    assert groups == [["a", "b"], ["c", "d"], ["e"], ["f"]]
    assert [len(b) for b in ga.batches(ga.plan_jobs([_spec("a")], 5, seed=0), 2)] == [2, 2, 1]


def test_output_names(tmp_path):
    assert pl.output_name(3, 42, "20240101120000") == "im_20240101120000_003_42.png"
    assert pl.output_name(0, 1, "x", sequence=7) == "im_000007.png"
    assert pl.next_sequence_number(tmp_path / "missing") == 1
    (tmp_path / "im_000004.png").write_bytes(b"")
    (tmp_path / "im_20240101120000_000_1.png").write_bytes(b"")
    assert pl.next_sequence_number(tmp_path) == 5
    assert pl.unique_path(tmp_path / "im_000004.png").name == "im_000004_1.png"
    assert pl.unique_path(tmp_path / "new.png").name == "new.png"


def test_vae_batch():
    assert ga.vae_batch(None, 8) is None and ga.vae_batch(0.5, 8) == 4 and ga.vae_batch(2, 8) == 2
    assert ga.vae_batch(0.01, 8) == 1


def _args(tmp_path, *extra) -> argparse.Namespace:
    ckpt = tmp_path / "model.safetensors"
    ckpt.write_bytes(b"x")
    return ga.parse_args(["--ckpt", str(ckpt), "--prompt", "a cat", *extra])


@pytest.mark.parametrize("extra, message", [
    (["--image_path", "x.png"], "not found"),
    (["--clip_vision_strength", "0.5"], "CLIP-vision"),
    (["--interactive"], "interactive"),  # reads prompts from stdin: not with --prompt
    (["--fp16", "--bf16"], "exclusive"),
    (["--steps", "0"], "--steps"),
    (["--sampler", "nope"], "unknown sampler"),
    (["--network_weights", "missing.safetensors"], "not found"),
])
def test_validate_args_rejects(tmp_path, extra, message):
    with pytest.raises(UserError, match=message):
        ga.validate_args(_args(tmp_path, *extra))


def test_validate_args_accepts_sd_scripts_line(tmp_path):
    args = _args(tmp_path, "--xformers", "--sdpa", "--W", "832", "--H", "1216", "--sampler", "K_EULER_A",
                 "--network_pre_calc", "--vae_batch_size", "0.5", "--max_embeddings_multiples", "2")
    ga.validate_args(args)
    assert args.sampler == "k_euler_a" and args.outdir == "outputs" and args.steps == 50 and args.scale == 7.5
