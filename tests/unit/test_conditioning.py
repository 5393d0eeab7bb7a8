"""Text conditioning against diffusers' own encode_prompt, long prompts, size ids, shipped tokenizers."""

from __future__ import annotations

import pytest
import torch

from library.diffusion.conditioning import TextConditioner, split_windows, time_ids
from library.models.checkpoint_io import load_sdxl
from library.models.tokenizers import load_tokenizers


@pytest.fixture(scope="module")
def conditioner(tiny_ckpt):
    models = load_sdxl(tiny_ckpt)
    return lambda mtl: TextConditioner(*load_tokenizers(), models.text_encoder1, models.text_encoder2, mtl)


@pytest.fixture(scope="module")
def pipe(tiny_diffusers):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(str(tiny_diffusers))


PROMPTS = ["a photo of a cat", "sks dog, " + ", ".join(["red ball"] * 50)]  # the second is > 150 tokens


@pytest.mark.parametrize("max_token_length", [None, 150, 225])
def test_matches_diffusers_encode_prompt(conditioner, pipe, max_token_length):
    """diffusers truncates at 77 tokens; our first window (BOS + 75 tokens) and the pooled output,
    which comes from the first window, must equal it exactly. Later windows are our extension."""
    with torch.no_grad():
        context, pooled = conditioner(max_token_length).encode(PROMPTS)
        ref_context, _, ref_pooled, _ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False)
    length = (max_token_length or 75) + 2
    assert context.shape == (2, length, 64 + 128) and pooled.shape == (2, 128)
    torch.testing.assert_close(context[:, :76], ref_context[:, :76], rtol=0, atol=0)
    torch.testing.assert_close(pooled, ref_pooled, rtol=0, atol=0)
    if max_token_length is None:
        torch.testing.assert_close(context, ref_context, rtol=0, atol=0)


def test_long_prompt_windows_carry_the_rest_of_the_prompt(conditioner):
    short, _ = conditioner(150).encode(["sks dog"])
    hundred_tokens = "sks dog, " + ", ".join(["red ball"] * 32)  # ~99 tokens: fills window 1, starts window 2
    long_a, _ = conditioner(150).encode([hundred_tokens])
    long_b, _ = conditioner(150).encode([hundred_tokens + ", blue sky"])
    assert short.shape[1] == 152
    assert torch.equal(long_a[:, :76], long_b[:, :76])  # the first window is the same text
    assert not torch.equal(long_a[:, 76:], long_b[:, 76:])  # the tail landed in the second window


def test_te2_windows_get_eos_fixups():
    pad, eos, bos = 0, 49407, 49406
    ids = torch.tensor([[bos] + [5] * 80 + [eos] + [pad] * 70])  # 152 tokens, text runs into window 2
    windows = split_windows(ids, pad)
    assert windows.shape == (1, 2, 77)
    assert windows[0, 0, -1] == eos  # window cut inside the text ends with EOS
    only_pad = split_windows(torch.tensor([[bos, 5, eos] + [pad] * 149]), pad)
    assert only_pad[0, 1, 1] == eos  # a window of padding still starts with EOS


def test_time_ids_order_is_heights_first():
    ids = time_ids(torch.tensor([[768, 1024]]), torch.tensor([[10, 20]]), torch.tensor([[704, 1024]]))
    assert ids.tolist() == [[768.0, 1024.0, 10.0, 20.0, 704.0, 1024.0]]


def test_shipped_tokenizers_are_the_real_clip_vocabulary(tmp_path):
    tok1, tok2 = load_tokenizers()
    assert len(tok1) == 49408 and len(tok2) == 49408
    assert tok1("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok1.pad_token_id == 49407 and tok2.pad_token_id == 0
    cached1, cached2 = load_tokenizers(tmp_path)  # writes the cache folders the first time
    assert (tmp_path / "openai_clip-vit-large-patch14" / "tokenizer_config.json").is_file()
    again1, again2 = load_tokenizers(tmp_path)  # reads them back
    assert again1("a dog").input_ids == tok1("a dog").input_ids and again2.pad_token_id == 0
