"""The two SDXL CLIP tokenizers, shipped with the package so nothing is downloaded.

Both use the real CLIP BPE vocabulary (49,408 ids, built from OpenAI CLIP's
``bpe_simple_vocab_16e6.txt.gz``). TE1 (CLIP ViT-L) pads with ``<|endoftext|>``; TE2 (OpenCLIP
ViT-bigG) pads with ``!`` (id 0) as OpenCLIP does.
"""

from __future__ import annotations

from pathlib import Path

from transformers import CLIPTokenizer

DATA = Path(__file__).parent / "data"
TOKENIZER1_HUB_ID = "openai/clip-vit-large-patch14"
TOKENIZER2_HUB_ID = "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k"
MODEL_MAX_LENGTH = 77


def _shipped(pad_token: str) -> CLIPTokenizer:
    return CLIPTokenizer(str(DATA / "vocab.json"), str(DATA / "merges.txt"), pad_token=pad_token,
                         model_max_length=MODEL_MAX_LENGTH)


def load_tokenizers(cache_dir: str | Path | None = None) -> tuple[CLIPTokenizer, CLIPTokenizer]:
    """Return (tokenizer1, tokenizer2).

    With ``cache_dir`` (``--tokenizer_cache_dir``), tokenizers saved there are used, and the
    shipped ones are saved there on first use (folder names as sd-scripts: hub id with ``/`` -> ``_``).
    """
    if cache_dir is None:
        return _shipped("<|endoftext|>"), _shipped("!")
    cache = Path(cache_dir)
    result = []
    for hub_id, pad in ((TOKENIZER1_HUB_ID, "<|endoftext|>"), (TOKENIZER2_HUB_ID, "!")):
        folder = cache / hub_id.replace("/", "_")
        if (folder / "tokenizer_config.json").is_file():
            tok = CLIPTokenizer.from_pretrained(str(folder))
            tok.pad_token = pad
        else:
            tok = _shipped(pad)
            tok.save_pretrained(str(folder))
        result.append(tok)
    return result[0], result[1]
