"""Prompt options, prompt files, attention weights, dynamic prompts and PNG generation metadata."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import pytest
from PIL import Image

from library.errors import UserError
from library.inference.png_metadata import (
    generation_pnginfo,
    parse_a1111_infotext,
    read_generation_params,
    read_png_text,
)
from library.inference.dynamic_prompts import expand_dynamic_prompts
from library.inference.prompts import PromptSpec, load_prompt_file, parse_prompt_line
from library.text.attention import BREAK_WEIGHT, parse_prompt_attention, tokenize_weighted

REPO = Path(__file__).resolve().parents[2]
TOKENIZER_DATA = REPO / "library" / "models" / "tokenizers" / "data"


# ---- inline options ------------------------------------------------------------------------------


def test_every_inline_option():
    spec = parse_prompt_line(
        "a cat, sitting --w 1024 --h 768 --ow 2048 --oh 1536 --nw 512 --nh 384 --ct 16 --cl 8"
        " --s 40 --d 1,2, 3 --l 6.5 --nl 2.5 --t 0.6 --n blurry, low quality --c a clip prompt"
        " --am 0.8,0.5 --ss euler_a --dsd1 3 --dst1 600 --dsd2 2 --dst2 500 --dsr 0.6"
        " --glt 700 --glr 0.4 --gle 2 --gls 0.1 --glsn 1.2 --glus 3,0.5,0.5,1"
    )
    assert spec.prompt == "a cat, sitting"
    assert (spec.width, spec.height) == (1024, 768)
    assert (spec.original_width, spec.original_height) == (2048, 1536)
    assert (spec.original_width_negative, spec.original_height_negative) == (512, 384)
    assert (spec.crop_top, spec.crop_left) == (16, 8)
    assert spec.steps == 40
    assert spec.seeds == [1, 2, 3] and spec.seed == 1
    assert spec.scale == 6.5
    assert spec.negative_scale == 2.5 and not spec.no_negative_scale
    assert spec.strength == 0.6
    assert spec.negative_prompt == "blurry, low quality"
    assert spec.clip_prompt == "a clip prompt"
    assert spec.network_multipliers == [0.8, 0.5]
    assert spec.sampler == "euler_a"
    assert (spec.ds_depth_1, spec.ds_timesteps_1, spec.ds_depth_2, spec.ds_timesteps_2) == (
        3, 600, 2, 500)
    assert spec.ds_ratio == 0.6
    assert spec.gradual_latent_timesteps == 700
    assert spec.gradual_latent_ratio == 0.4
    assert spec.gradual_latent_every_n_steps == 2
    assert spec.gradual_latent_ratio_step == 0.1
    assert spec.gradual_latent_s_noise == 1.2
    assert spec.gradual_latent_unsharp_params == "3,0.5,0.5,1"
    assert spec.raw_prompt.startswith("a cat, sitting --w 1024")


def test_option_names_are_case_insensitive():
    spec = parse_prompt_line("a dog --W 640 --H 480 --S 12 --N bad --SS K_Euler")
    assert (spec.width, spec.height, spec.steps) == (640, 480, 12)
    assert spec.negative_prompt == "bad"
    assert spec.sampler == "k_euler"


def test_no_options_leaves_everything_unset():
    spec = parse_prompt_line("  just a prompt  ")
    assert spec.prompt == "just a prompt"
    assert spec == PromptSpec(prompt="just a prompt", raw_prompt="just a prompt")


def test_options_only_and_dashes_inside_prompt():
    assert parse_prompt_line("--w 512 --h 512").prompt == ""
    spec = parse_prompt_line("well-lit room -- sunny --w 512")
    assert spec.prompt == "well-lit room -- sunny"
    assert spec.width == 512


def test_negative_scale_none():
    spec = parse_prompt_line("x --nl none")
    assert spec.negative_scale is None and spec.no_negative_scale
    assert spec.with_defaults(negative_scale=4.0).negative_scale is None
    assert parse_prompt_line("x").with_defaults(negative_scale=4.0).negative_scale == 4.0


@pytest.mark.parametrize(
    "line, option",
    [
        ("a cat --w 10x24", "--w"),
        ("a cat --h 5.5", "--h"),
        ("a cat --s many", "--s"),
        ("a cat --d 1,two", "--d"),
        ("a cat --l high", "--l"),
        ("a cat --nl abc", "--nl"),
        ("a cat --t 1.5", "--t"),
        ("a cat --am 0.5,x", "--am"),
        ("a cat --ct", "--ct"),
        ("a cat --ss euler_b", "--ss"),
        ("a cat --l nan", "--l"),
    ],
)
def test_bad_number_names_option_and_line(line, option):
    with pytest.raises(UserError) as info:
        parse_prompt_line(line)
    message = str(info.value)
    assert option in message
    assert line in message


def test_error_names_source():
    with pytest.raises(UserError, match=r"prompts\.txt:7"):
        parse_prompt_line("a --w x", source="prompts.txt:7")


def test_unknown_option_warns_and_is_ignored(caplog):
    with caplog.at_level(logging.WARNING, logger="library.inference.prompts"):
        spec = parse_prompt_line("a cat --zz 3 --w 512 --g 3.5")
    assert spec.width == 512 and spec.prompt == "a cat"
    text = caplog.text
    assert "--zz" in text and "--g" in text


# ---- defaults ------------------------------------------------------------------------------------


def test_with_defaults_fills_and_rounds():
    spec = parse_prompt_line("a cat --w 1023 --h 20 --s 0").with_defaults(
        steps=50, scale=7.0, seed=42, sampler="euler"
    )
    assert (spec.width, spec.height) == (1016, 64)
    assert spec.steps == 1
    assert spec.scale == 7.0
    assert spec.seeds == [42]
    assert spec.sampler == "euler"
    assert spec.negative_prompt == ""
    assert (spec.original_width, spec.original_height) == (1016, 64)
    assert (spec.original_width_negative, spec.original_height_negative) == (1016, 64)
    assert (spec.crop_top, spec.crop_left) == (0, 0)


def test_with_defaults_sd_scripts_defaults_and_clamps():
    spec = PromptSpec(prompt="x").with_defaults()
    assert (spec.width, spec.height, spec.steps, spec.scale) == (512, 512, 30, 7.5)
    assert spec.sampler == "ddim"
    assert spec.seeds is None
    assert PromptSpec(prompt="x", steps=5000).with_defaults().steps == 1000


def test_with_defaults_prompt_values_win():
    spec = parse_prompt_line("x --d 7 --ss heun --ow 4096 --n nope --am 0.3").with_defaults(
        seed=1, sampler="ddim", original_width=1024, original_height=2048,
        negative_prompt="default neg", network_multipliers=[1.0, 1.0],
        width=1024, height=1024,
    )
    assert spec.seeds == [7]
    assert spec.sampler == "heun"
    assert (spec.original_width, spec.original_height) == (4096, 2048)
    assert (spec.original_width_negative, spec.original_height_negative) == (4096, 2048)
    assert spec.negative_prompt == "nope"
    assert spec.network_multipliers == [0.3]


def test_with_defaults_does_not_modify_original():
    spec = parse_prompt_line("x --d 3")
    filled = spec.with_defaults()
    filled.seeds.append(4)
    assert spec.seeds == [3] and spec.width is None


# ---- prompt files --------------------------------------------------------------------------------


def test_txt_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text(
        "# a comment\n\nfirst prompt --w 768 --d 5\n   \n  # indented comment\nsecond --n bad\n",
        encoding="utf-8",
    )
    specs = load_prompt_file(path)
    assert [s.prompt for s in specs] == ["first prompt", "second"]
    assert specs[0].width == 768 and specs[0].seeds == [5]
    assert specs[1].negative_prompt == "bad"


def test_txt_file_error_names_file_and_line(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("ok\n# c\nbad --s lots\n", encoding="utf-8")
    with pytest.raises(UserError) as info:
        load_prompt_file(path)
    assert f"{path}:3" in str(info.value) and "--s" in str(info.value)


def test_toml_file(tmp_path):
    path = tmp_path / "prompts.toml"
    path.write_text(
        """
[prompt]
negative_prompt = "low quality"
sample_steps = 20
width = 1024
height = 1024
scale = 7
seed = 1

[[prompt.subset]]
prompt = "a red apple"

[[prompt.subset]]
prompt = "a blue car"
width = 1216
height = 832
seed = 2
sample_sampler = "Euler_A"
negative_scale = 3.5
network_multipliers = [0.5, 1.0]
""",
        encoding="utf-8",
    )
    first, second = load_prompt_file(path)
    assert first.prompt == "a red apple"
    assert (first.width, first.height, first.steps, first.scale) == (1024, 1024, 20, 7.0)
    assert first.seeds == [1] and first.negative_prompt == "low quality"
    assert second.prompt == "a blue car"
    assert (second.width, second.height, second.steps) == (1216, 832, 20)
    assert second.seeds == [2]
    assert second.sampler == "euler_a"
    assert second.negative_scale == 3.5
    assert second.network_multipliers == [0.5, 1.0]


def test_toml_file_errors_name_file(tmp_path):
    broken = tmp_path / "broken.toml"
    broken.write_text("[prompt\nx = 1", encoding="utf-8")
    with pytest.raises(UserError, match="broken.toml"):
        load_prompt_file(broken)
    bad_value = tmp_path / "bad.toml"
    bad_value.write_text('[[prompt.subset]]\nprompt = "a"\nwidth = "wide"\n', encoding="utf-8")
    with pytest.raises(UserError) as info:
        load_prompt_file(bad_value)
    assert "bad.toml" in str(info.value) and "width" in str(info.value)
    empty = tmp_path / "empty.toml"
    empty.write_text("[prompt]\nwidth = 512\n", encoding="utf-8")
    with pytest.raises(UserError, match="empty.toml"):
        load_prompt_file(empty)


def test_json_file(tmp_path, caplog):
    path = tmp_path / "prompts.json"
    path.write_text(
        json.dumps(
            [
                {"prompt": "a castle", "width": 896, "height": 1152, "seed": [3, 4],
                 "sample_steps": 25, "negative_prompt": "fog", "scale": 5},
                {"prompt": "a lake", "mystery": 1, "strength": 0.5, "enum": 3},
            ]
        ),
        encoding="utf-8",
    )
    with caplog.at_level(logging.WARNING, logger="library.inference.prompts"):
        castle, lake = load_prompt_file(path)
    assert (castle.width, castle.height, castle.steps) == (896, 1152, 25)
    assert castle.seeds == [3, 4] and castle.scale == 5.0 and castle.negative_prompt == "fog"
    assert lake.prompt == "a lake" and lake.strength == 0.5 and lake.width is None
    assert "mystery" in caplog.text and "enum" not in caplog.text


def test_json_file_errors_name_file(tmp_path):
    path = tmp_path / "list.json"
    path.write_text('["just a string"]', encoding="utf-8")
    with pytest.raises(UserError, match="list.json"):
        load_prompt_file(path)
    path = tmp_path / "types.json"
    path.write_text('[{"prompt": "a", "steps": true}]', encoding="utf-8")
    with pytest.raises(UserError, match="types.json"):
        load_prompt_file(path)
    path = tmp_path / "syntax.json"
    path.write_text('[{"prompt": ', encoding="utf-8")
    with pytest.raises(UserError, match="syntax.json"):
        load_prompt_file(path)


def test_missing_prompt_file(tmp_path):
    with pytest.raises(UserError, match="nothing.txt"):
        load_prompt_file(tmp_path / "nothing.txt")


# ---- attention weights ---------------------------------------------------------------------------


def _approx(pairs):
    return [(text, pytest.approx(weight)) for text, weight in pairs]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("a cat", [("a cat", 1.0)]),
        ("(a)", [("a", 1.1)]),
        ("((a))", [("a", 1.21)]),
        ("[a]", [("a", 1 / 1.1)]),
        ("[[a]]", [("a", 1 / 1.21)]),
        ("(a:1.3)", [("a", 1.3)]),
        ("(a cat : 1.3 ) dog", [("a cat ", 1.3), (" dog", 1.0)]),
        ("(a:.5)", [("a", 0.5)]),
        ("x (a (b:1.5) c) y", [("x ", 1.0), ("a ", 1.1), ("b", 1.65), (" c", 1.1), (" y", 1.0)]),
        ("((a) b)", [("a", 1.21), (" b", 1.1)]),
        ("[(a)]", [("a", 1.0)]),
        ("\\(literal\\) \\[x\\]", [("(literal) [x]", 1.0)]),
        ("a \\\\ b", [("a \\ b", 1.0)]),
        ("(unclosed", [("unclosed", 1.1)]),
        ("[unclosed", [("unclosed", 1 / 1.1)]),
        ("extra) close]", [("extra) close]", 1.0)]),
        ("(a:b)", [("a:b", 1.1)]),
        ("style: anime", [("style: anime", 1.0)]),
        ("(a) (b)", [("a", 1.1), (" ", 1.0), ("b", 1.1)]),
        ("(a)(b)", [("ab", 1.1)]),
        ("", [("", 1.0)]),
        ("()", [("", 1.0)]),
    ],
)
def test_parse_prompt_attention(text, expected):
    assert parse_prompt_attention(text) == _approx(expected)


def test_break_marker():
    assert parse_prompt_attention("a BREAK (b) BREAK BREAK c") == _approx(
        [("a", 1.0), ("BREAK", BREAK_WEIGHT), ("b", 1.1), ("BREAK", BREAK_WEIGHT),
         ("BREAK", BREAK_WEIGHT), ("c", 1.0)]
    )
    assert parse_prompt_attention("BREAKFAST") == [("BREAKFAST", 1.0)]
    assert parse_prompt_attention("(a BREAK b)") == _approx(
        [("a", 1.1), ("BREAK", BREAK_WEIGHT), ("b", 1.1)])


@pytest.fixture(scope="module")
def clip_tokenizer():
    transformers = pytest.importorskip("transformers")
    return transformers.CLIPTokenizer(
        str(TOKENIZER_DATA / "vocab.json"), str(TOKENIZER_DATA / "merges.txt"),
        pad_token="<|endoftext|>",
    )


def _plain_ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False).input_ids


def test_tokenize_weighted_plain(clip_tokenizer):
    ids, weights = tokenize_weighted(clip_tokenizer, "a photo of a cat", 3)
    assert ids == _plain_ids(clip_tokenizer, "a photo of a cat")
    assert clip_tokenizer.bos_token_id not in ids and clip_tokenizer.eos_token_id not in ids
    assert weights == [1.0] * len(ids)


def test_tokenize_weighted_weights(clip_tokenizer):
    ids, weights = tokenize_weighted(clip_tokenizer, "a (red:1.5) [cat], \\(dog\\)", 1)
    expected_ids = (
        _plain_ids(clip_tokenizer, "a ") + _plain_ids(clip_tokenizer, "red")
        + _plain_ids(clip_tokenizer, " ") + _plain_ids(clip_tokenizer, "cat")
        + _plain_ids(clip_tokenizer, ", (dog)")
    )
    assert ids == expected_ids
    red = _plain_ids(clip_tokenizer, "red")
    cat = _plain_ids(clip_tokenizer, "cat")
    start = len(_plain_ids(clip_tokenizer, "a "))
    assert weights[start:start + len(red)] == pytest.approx([1.5] * len(red))
    cat_start = start + len(red)
    assert weights[cat_start:cat_start + len(cat)] == pytest.approx([1 / 1.1] * len(cat))
    assert weights[0] == 1.0 and weights[-1] == 1.0
    assert len(ids) == len(weights)


def test_tokenize_weighted_truncates_to_windows(clip_tokenizer, caplog):
    text = " ".join(["cat"] * 200)
    with caplog.at_level(logging.WARNING, logger="library.inference.prompts"):
        ids, weights = tokenize_weighted(clip_tokenizer, text, 2)
    assert len(ids) == 150 and len(weights) == 150
    assert "150" in caplog.text
    ids, _ = tokenize_weighted(clip_tokenizer, text, 3)
    assert len(ids) == 200


def test_tokenize_weighted_break_pads_to_window(clip_tokenizer):
    ids, weights = tokenize_weighted(clip_tokenizer, "a cat BREAK a dog", 3)
    first = _plain_ids(clip_tokenizer, "a cat")
    assert ids[: len(first)] == first
    assert ids[len(first):75] == [clip_tokenizer.pad_token_id] * (75 - len(first))
    assert ids[75:] == _plain_ids(clip_tokenizer, "a dog")
    assert len(weights) == len(ids)


# ---- dynamic prompts -----------------------------------------------------------------------------


def test_dynamic_no_groups():
    assert expand_dynamic_prompts("a plain prompt", random.Random(0)) == ["a plain prompt"]


def test_dynamic_random_is_seeded():
    text = "a {red|green|blue} {cat|dog|bird} in {rain|snow}"
    first = expand_dynamic_prompts(text, random.Random(123))
    assert first == expand_dynamic_prompts(text, random.Random(123))
    assert len(first) == 1
    seen = {expand_dynamic_prompts(text, random.Random(seed))[0] for seed in range(40)}
    assert len(seen) > 3
    for prompt in seen:
        assert "{" not in prompt and "|" not in prompt
        colour, animal = prompt.split()[1:3]
        assert colour in {"red", "green", "blue"} and animal in {"cat", "dog", "bird"}


def test_dynamic_enumeration_all_combinations():
    result = expand_dynamic_prompts("{e$$a|b} and {e$$x|y|z}", random.Random(0))
    assert result == [
        "a and x", "a and y", "a and z", "b and x", "b and y", "b and z",
    ]


def test_dynamic_enumeration_with_random_group():
    result = expand_dynamic_prompts("{e$$cat|dog} on {grass|sand}", random.Random(5))
    assert len(result) == 2
    assert result[0].startswith("cat on ") and result[1].startswith("dog on ")
    assert result[0].split(" on ")[1] == result[1].split(" on ")[1]


def test_dynamic_counts_and_separator():
    rng = random.Random(7)
    two = expand_dynamic_prompts("{2$$a|b|c}", rng)[0].split(", ")
    assert len(two) == 2 and len(set(two)) == 2 and set(two) <= {"a", "b", "c"}
    joined = expand_dynamic_prompts("{3$$ and $$a|b|c}", rng)[0]
    assert sorted(joined.split(" and ")) == ["a", "b", "c"]
    for seed in range(20):
        picked = expand_dynamic_prompts("{1-2$$a|b|c}", random.Random(seed))[0].split(", ")
        assert 1 <= len(picked) <= 2
    assert len(expand_dynamic_prompts("{9$$a|b}", rng)[0].split(", ")) == 2


def test_dynamic_nested_and_escaped():
    for seed in range(10):
        (result,) = expand_dynamic_prompts("{a|{b|c}} \\{kept\\}", random.Random(seed))
        assert result.split()[0] in {"a", "b", "c"}
        assert result.endswith("{kept}")


def test_dynamic_bad_count_and_too_many():
    with pytest.raises(UserError, match="count"):
        expand_dynamic_prompts("{x$$a|b}", random.Random(0))
    many = " ".join(["{e$$a|b|c|d|e|f|g|h|i|j}"] * 5)
    with pytest.raises(UserError, match="more than"):
        expand_dynamic_prompts(many, random.Random(0))


# ---- PNG generation metadata ---------------------------------------------------------------------


def _params():
    return {
        "prompt": "a cat, (masterpiece:1.2)",
        "raw_prompt": "a cat, (masterpiece:1.2) --w 64 --h 48 --d 1234",
        "negative_prompt": "blurry, lowres",
        "seed": 1234,
        "sampler": "euler_a",
        "steps": 30,
        "scale": 7.5,
        "negative_scale": 3.0,
        "width": 64,
        "height": 48,
        "original_width": 1024,
        "original_height": 768,
        "original_width_negative": 512,
        "original_height_negative": 384,
        "crop_top": 0,
        "crop_left": 16,
        "ckpt": "/models/sd_xl_base_1.0.safetensors",
        "network_weights": ["/loras/style.safetensors", "/loras/char.safetensors"],
        "network_multipliers": [0.8, 0.5],
        "clip_skip": 2,
    }


def _save(tmp_path, params):
    path = tmp_path / "image.png"
    Image.new("RGB", (64, 48), (10, 20, 30)).save(path, pnginfo=generation_pnginfo(params))
    return path


def test_png_round_trip(tmp_path):
    params = _params()
    path = _save(tmp_path, params)
    assert read_generation_params(path) == params

    text = read_png_text(path)
    assert text["prompt"] == params["prompt"]
    assert text["seed"] == "1234"
    assert text["sampler"] == "euler_a"
    assert text["steps"] == "30"
    assert text["scale"] == "7.5"
    assert text["negative-prompt"] == "blurry, lowres"
    assert text["negative-scale"] == "3.0"
    assert text["raw-prompt"] == params["raw_prompt"]
    assert (text["original-height"], text["original-width"]) == ("768", "1024")
    assert (text["original-height-negative"], text["original-width-negative"]) == ("384", "512")
    assert (text["crop-top"], text["crop-left"]) == ("0", "16")
    assert json.loads(text["sdxl-trainer"]) == params


def test_png_a1111_parameters(tmp_path):
    text = read_png_text(_save(tmp_path, _params()))["parameters"]
    lines = text.split("\n")
    assert lines[0] == "a cat, (masterpiece:1.2)"
    assert lines[1] == "Negative prompt: blurry, lowres"
    for part in ("Steps: 30", "Sampler: Euler a", "CFG scale: 7.5", "Seed: 1234", "Size: 64x48",
                 "Model: sd_xl_base_1.0", "Clip skip: 2", 'Lora: "style:0.8, char:0.5"'):
        assert part in lines[2]
    parsed = parse_a1111_infotext(text)
    assert parsed["prompt"] == "a cat, (masterpiece:1.2)"
    assert parsed["negative_prompt"] == "blurry, lowres"
    assert (parsed["steps"], parsed["scale"], parsed["seed"]) == (30, 7.5, 1234)
    assert (parsed["width"], parsed["height"]) == (64, 48)
    assert parsed["sampler"] == "Euler a"


def test_png_sd_scripts_only_keys_are_read(tmp_path):
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    for key, value in {"prompt": "a dog", "seed": "5", "sampler": "ddim", "steps": "50",
                       "scale": "7.5", "negative-prompt": "bad", "crop-top": "0"}.items():
        info.add_text(key, value)
    path = tmp_path / "sd_scripts.png"
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    assert read_generation_params(path) == {
        "prompt": "a dog", "seed": 5, "sampler": "ddim", "steps": 50, "scale": 7.5,
        "negative_prompt": "bad", "crop_top": 0,
    }


def test_png_unicode_and_minimal(tmp_path):
    params = {"prompt": "猫 (かわいい:1.2)", "seed": None, "steps": 20}
    path = _save(tmp_path, params)
    assert read_generation_params(path) == params
    text = read_png_text(path)
    assert text["prompt"] == params["prompt"] and "seed" not in text
    assert "raw-prompt" not in text


def test_png_unreadable(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(UserError, match="bad.png"):
        read_generation_params(bad)
    with pytest.raises(UserError, match="missing.png"):
        read_generation_params(tmp_path / "missing.png")
