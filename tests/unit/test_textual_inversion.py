"""Unit tests of the textual-inversion pieces: token names, init vectors, caption check, the lookup hook, files."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from library.errors import UserError
from library.models.embedding_file import read_embedding, write_embedding
from library.models.tokenizers import load_tokenizers
from library.training.textual_inversion import (
    check_captions,
    check_new_tokens,
    initial_vectors,
    override_hook,
    token_names,
)


def test_token_names_and_vocabulary_check():
    assert token_names("sks", 3) == ["sks", "sks1", "sks2"]
    tokenizers = load_tokenizers()
    check_new_tokens(tokenizers, token_names("sksxyz", 2))
    with pytest.raises(UserError, match="'a' is already"):
        check_new_tokens(tokenizers, ["a"])


def test_init_word_rows_repeat_cyclically_and_truncate():
    tok = load_tokenizers()[0]
    table = torch.randn(49408, 8)
    ids = tok.encode("red dog", add_special_tokens=False)
    assert len(ids) == 2
    v = initial_vectors(tok, table, 5, "red dog")
    assert all(torch.equal(v[i], table[ids[i % 2]]) for i in range(5))
    assert torch.equal(initial_vectors(tok, table, 1, "red dog"), table[ids[:1]])
    assert torch.allclose(initial_vectors(tok, table, 2, None), table.mean(0).expand(2, 8))


def test_hook_replaces_only_new_ids_and_gives_gradients_only_to_the_vectors():
    emb = torch.nn.Embedding(12, 4).requires_grad_(False)
    vectors = torch.nn.Parameter(torch.randn(2, 4))
    emb.register_forward_hook(override_hook(10, vectors))
    ids = torch.tensor([[1, 10, 3, 11]])
    out = emb(ids)
    assert torch.equal(out[0, 0], emb.weight[1]) and torch.equal(out[0, 1], vectors[0].detach())
    assert torch.equal(out[0, 3], vectors[1].detach())
    out[0, 1].sum().backward()
    assert emb.weight.grad is None and torch.equal(vectors.grad[1], torch.zeros(4)) and vectors.grad[0].abs().sum() > 0


def test_caption_check_lists_ten_files_and_counts_the_rest():
    items = [SimpleNamespace(path=f"img{i}.png", caption="a dog" if i else "sks dog", is_reg=False, dataset_index=0,
                             subset_index=0) for i in range(13)]
    items.append(SimpleNamespace(path="reg.png", caption="a dog", is_reg=True, dataset_index=0, subset_index=0))
    data = SimpleNamespace(items=items, configs=[SimpleNamespace(subsets=[SimpleNamespace(caption_prefix=None,
                                                                                           caption_suffix=None)])])
    with pytest.raises(UserError) as exc:
        check_captions(data, "sks")
    msg = str(exc.value)
    assert "12 training image(s)" in msg and "img10.png" in msg and "img11.png" not in msg and "and 2 more" in msg
    assert "img0.png" not in msg and "reg.png" not in msg and "\n" not in msg
    data.configs[0].subsets[0].caption_prefix = "sks, "  # the prefix puts the token into every caption
    check_captions(data, "sks")


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_embedding_file_round_trip_and_foreign_layouts(tmp_path, suffix):
    l, g = torch.randn(3, 8), torch.randn(3, 16)
    path = write_embedding(tmp_path / f"e{suffix}", l, g, torch.float16, {"k": "v"})
    rl, rg = read_embedding(path)
    assert torch.equal(rl, l.half().float()) and torch.equal(rg, g.half().float())
    assert not list(tmp_path.glob(".*.tmp"))  # the temporary file was renamed into place
    torch.save({"clip_g": torch.randn(16), "clip_l": torch.randn(8)}, tmp_path / "one.pt")  # 1-D single vectors
    assert read_embedding(tmp_path / "one.pt")[0].shape == (1, 8)
    torch.save({"string_to_param": {"*": torch.randn(1, 768)}}, tmp_path / "sd1.pt")
    with pytest.raises(UserError, match="not an SDXL embedding"):
        read_embedding(tmp_path / "sd1.pt")
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(UserError, match="cannot read"):
        read_embedding(tmp_path / "bad.safetensors")
