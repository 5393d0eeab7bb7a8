"""Caption files and caption processing (section 2.3 order), all seeded."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

from library.data.captions import (
    CaptionOptions,
    expand_wildcards,
    process_caption,
    read_caption,
    resolve_token_warmup_step,
)
from library.errors import UserError

TAGS = "sks dog, red collar, grass, sunny, park, running, happy"


def run(text: str, seed: int = 0, epoch: int = 1, step: int = 0, **options) -> str:
    return process_caption(text, CaptionOptions(**options), random.Random(seed), epoch, step)


# ---- reading --------------------------------------------------------------------------------

def test_read_caption_default_extension_and_missing(tmp_path):
    image = tmp_path / "a.png"
    image.write_bytes(b"")
    assert read_caption(image) is None
    (tmp_path / "a.caption").write_text("sks dog\n", encoding="utf-8")
    (tmp_path / "a.txt").write_text("from txt", encoding="utf-8")
    assert read_caption(image) == "sks dog"
    assert read_caption(image, ".txt") == "from txt"
    assert read_caption(image, "txt") == "from txt"  # missing dot tolerated


def test_read_caption_face_crop_name(tmp_path):
    (tmp_path / "portrait.caption").write_text("a face", encoding="utf-8")
    assert read_caption(tmp_path / "portrait_10_20_300_400.png") == "a face"


def test_read_caption_not_utf8_names_file(tmp_path):
    (tmp_path / "b.caption").write_bytes("caf\u00e9".encode("latin-1"))
    with pytest.raises(UserError, match=r"b\.caption.*UTF-8"):
        read_caption(tmp_path / "b.png")


def test_read_caption_bom_and_multiline(tmp_path):
    (tmp_path / "c.caption").write_bytes("\ufefffirst line\n\nsecond line\nthird\n".encode())
    assert read_caption(tmp_path / "c.png") == "first line"
    assert read_caption(tmp_path / "c.png", enable_wildcard=True) == "first line\nsecond line\nthird"
    picks = {read_caption(tmp_path / "c.png", enable_wildcard=True, rng=random.Random(s))
             for s in range(30)}
    assert picks == {"first line", "second line", "third"}


def test_read_caption_empty_file(tmp_path):
    (tmp_path / "d.caption").write_text("", encoding="utf-8")
    assert read_caption(tmp_path / "d.png") == ""


# ---- processing -----------------------------------------------------------------------------

def test_no_options_is_identity():
    assert run(TAGS) == TAGS
    assert run("a {b|c} d") == "a {b|c} d"  # wildcards only with enable_wildcard


def test_prefix_suffix():
    assert run("dog", caption_prefix="photo of", caption_suffix="4k") == "photo of dog 4k"


def test_shuffle_is_seeded_and_keeps_tokens():
    first = run(TAGS, seed=1, shuffle_caption=True, keep_tokens=1)
    assert first == run(TAGS, seed=1, shuffle_caption=True, keep_tokens=1)
    outputs = {run(TAGS, seed=s, shuffle_caption=True, keep_tokens=1) for s in range(20)}
    assert len(outputs) > 5
    for out in outputs:
        tags = out.split(", ")
        assert tags[0] == "sks dog"
        assert sorted(tags) == sorted(t.strip() for t in TAGS.split(","))


def test_keep_tokens_separator_with_fixed_suffix():
    text = "sks dog, masterpiece ||| a, b, c, d, e ||| trailing, end"
    for seed in range(10):
        out = run(text, seed=seed, shuffle_caption=True, keep_tokens_separator="|||")
        tags = out.split(", ")
        assert tags[:2] == ["sks dog", "masterpiece"]
        assert tags[-2:] == ["trailing", "end"]
        assert sorted(tags[2:-2]) == ["a", "b", "c", "d", "e"]
        assert "|||" not in out
    # The separator is removed even when nothing is shuffled.
    assert run("x ||| y, z", keep_tokens_separator="|||") == "x, y, z"


def test_caption_dropout_rate():
    assert run(TAGS, caption_dropout_rate=1.0) == ""
    results = [run(TAGS, seed=s, caption_dropout_rate=0.5) for s in range(200)]
    dropped = sum(r == "" for r in results)
    assert 60 < dropped < 140
    assert results == [run(TAGS, seed=s, caption_dropout_rate=0.5) for s in range(200)]


def test_caption_dropout_every_n_epochs():
    outs = [run("dog", epoch=e, caption_dropout_every_n_epochs=3) for e in range(1, 7)]
    assert outs == ["dog", "dog", "", "dog", "dog", ""]


def test_tag_dropout_never_drops_kept_tokens():
    out = run(TAGS, caption_tag_dropout_rate=1.0, keep_tokens=2)
    assert out == "sks dog, red collar"
    partial = [run(TAGS, seed=s, caption_tag_dropout_rate=0.5, keep_tokens=1) for s in range(20)]
    assert all(p.startswith("sks dog") for p in partial)
    assert len({len(p.split(", ")) for p in partial}) > 1


def test_wildcards_and_escapes():
    opts = dict(enable_wildcard=True)
    outs = {run("a {red|blue|green} car", seed=s, **opts) for s in range(40)}
    assert outs == {"a red car", "a blue car", "a green car"}
    assert run("{{literal}} {x}", **opts) == "{literal} x"
    assert run("unclosed {brace", **opts) == "unclosed {brace"
    assert expand_wildcards("{a|}", random.Random(0)) in {"a", ""}


def test_wildcard_random_line_gets_prefix():
    outs = {run("line one\nline two", seed=s, enable_wildcard=True, caption_prefix="P")
            for s in range(30)}
    assert outs == {"P line one", "P line two"}
    assert run("line one\nline two", caption_prefix="P") == "P line one"


def test_token_warmup_truncates_then_grows():
    options = dict(token_warmup_min=1, token_warmup_step=6, keep_tokens=1)
    counts = [len(run(TAGS, step=s, **options).split(", ")) for s in (0, 3, 6, 100)]
    # keep 1 fixed + flexible 1 at step 0, 1 + floor(3*5/6) = 3 at step 3, all 6 afterwards.
    assert counts == [1 + 1, 1 + 3, 7, 7]


def test_secondary_separator_replaced_last():
    text = "sks dog, red;;;collar, grass"
    outs = {run(text, seed=s, shuffle_caption=True, secondary_separator=";;;") for s in range(20)}
    for out in outs:
        assert "red,collar" in out  # kept together while shuffling, then replaced
        assert ";;;" not in out


def test_processing_order_dropout_before_wildcard_consumes_rng_in_order():
    opts = CaptionOptions(caption_dropout_rate=0.3, enable_wildcard=True, shuffle_caption=True)
    a = [process_caption("{x|y}, b, c, d", opts, random.Random(5), 1, 0) for _ in range(3)]
    assert len(set(a)) == 1  # same seed, same result
    rng = random.Random(5)
    sequence = [process_caption("{x|y}, b, c, d", opts, rng, 1, 0) for _ in range(10)]
    rng = random.Random(5)
    assert sequence == [process_caption("{x|y}, b, c, d", opts, rng, 1, 0) for _ in range(10)]


def test_options_from_subset_and_warmup_fraction():
    subset = SimpleNamespace(shuffle_caption=True, keep_tokens=2, token_warmup_step=0.25,
                             caption_prefix=None, unrelated=1)
    opts = CaptionOptions.from_subset(subset, max_train_steps=1000)
    assert opts.shuffle_caption and opts.keep_tokens == 2 and opts.token_warmup_step == 250
    assert opts.is_random and opts.uses_tag_ops
    assert not CaptionOptions().is_random
    assert resolve_token_warmup_step(0, None) == 0
    assert resolve_token_warmup_step(40, None) == 40
    with pytest.raises(ValueError):
        resolve_token_warmup_step(0.5, None)
