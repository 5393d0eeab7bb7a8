"""Generation parameters in PNG text chunks: written by the generator, read back to regenerate.

Three views of the same parameters are written so every tool finds what it looks for:

* the sd-scripts keys (``prompt``, ``seed``, ``sampler``, ``steps``, ``scale``, ``negative-prompt``,
  ``negative-scale``, ``clip-prompt``, ``raw-prompt``, ``original-height``, ``original-width``,
  ``original-height-negative``, ``original-width-negative``, ``crop-top``, ``crop-left``), one
  value per chunk, as ``sdxl_gen_img.py`` writes them;
* ``parameters``: A1111's single text ("prompt / Negative prompt: ... / Steps: 30, Sampler: ...")
  that image browsers and model sites read;
* ``sdxl-trainer``: JSON of every parameter given (LoRA files and multipliers included), the
  lossless copy :func:`read_generation_params` prefers.

Parameter names are the snake_case form of the sd-scripts keys (``negative_prompt``,
``original_height`` ...) plus e.g. ``width``, ``height``, ``strength``, ``ckpt``, ``vae``,
``clip_skip``, ``network_weights``, ``network_multipliers``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable, Optional

from PIL import Image, PngImagePlugin

from library.errors import UserError

TRAINER_KEY = "sdxl-trainer"
A1111_KEY = "parameters"

# (parameter name, PNG key, type used when reading back)
_SD_SCRIPTS_KEYS: tuple[tuple[str, str, Callable[[str], Any]], ...] = (
    ("prompt", "prompt", str),
    ("seed", "seed", int),
    ("sampler", "sampler", str),
    ("steps", "steps", int),
    ("scale", "scale", float),
    ("negative_prompt", "negative-prompt", str),
    ("negative_scale", "negative-scale", float),
    ("clip_prompt", "clip-prompt", str),
    ("raw_prompt", "raw-prompt", str),
    ("original_height", "original-height", int),
    ("original_width", "original-width", int),
    ("original_height_negative", "original-height-negative", int),
    ("original_width_negative", "original-width-negative", int),
    ("crop_top", "crop-top", int),
    ("crop_left", "crop-left", int),
)

# A1111 infotext key -> (parameter name, type)
_A1111_READ: dict[str, tuple[str, Callable[[str], Any]]] = {
    "Steps": ("steps", int),
    "Sampler": ("sampler", str),
    "CFG scale": ("scale", float),
    "Seed": ("seed", int),
    "Denoising strength": ("strength", float),
    "Clip skip": ("clip_skip", int),
    "Model": ("ckpt", str),
    "VAE": ("vae", str),
}


def _jsonable(value: Any) -> Any:
    """Fallback for ``json.dumps``: paths, sets, tensors/numpy values, anything else as text."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=str)
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def _a1111_quote(text: str) -> str:
    """Quote an infotext value the way A1111 does when it holds a separator."""
    if any(ch in text for ch in ",:\n\""):
        return json.dumps(text, ensure_ascii=False)
    return text


def _number_text(value: Any) -> str:
    """Numbers as short text (``7.5``, ``30``); other values with ``str``."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _network_summary(params: dict) -> Optional[str]:
    """``"stem:0.8, stem2:0.5"`` for the LoRA files in ``params`` (None when there are none)."""
    files = params.get("network_weights") or []
    if isinstance(files, (str, Path)):
        files = [files]
    if not files:
        return None
    multipliers = params.get("network_multipliers") or params.get("network_mul") or []
    if not isinstance(multipliers, (list, tuple)):
        multipliers = [multipliers]
    items = []
    for index, file in enumerate(files):
        mult = multipliers[min(index, len(multipliers) - 1)] if multipliers else 1.0
        items.append(f"{Path(str(file)).stem}:{_number_text(mult)}")
    return ", ".join(items)


def a1111_infotext(params: dict) -> str:
    """A1111's ``parameters`` text: prompt, ``Negative prompt:`` line, ``Key: value, ...`` line."""
    from library.inference.samplers import a1111_sampler_name

    fields: list[tuple[str, Any]] = [
        ("Steps", params.get("steps")),
        ("Sampler", a1111_sampler_name(str(params["sampler"])) if params.get("sampler") else None),
        ("CFG scale", params.get("scale")),
        ("Seed", params.get("seed")),
    ]
    if params.get("width") is not None and params.get("height") is not None:
        fields.append(("Size", f"{params['width']}x{params['height']}"))
    for label, name in (("Model", "ckpt"), ("VAE", "vae")):
        if params.get(name):
            fields.append((label, Path(str(params[name])).stem))
    fields += [
        ("Denoising strength", params.get("strength")),
        ("Clip skip", params.get("clip_skip")),
        ("Lora", _network_summary(params)),
        ("Version", "sdxl-trainer"),
    ]
    line = ", ".join(
        f"{key}: {_a1111_quote(_number_text(value))}" for key, value in fields if value is not None
    )
    text = str(params.get("prompt") or "")
    if params.get("negative_prompt"):
        text += f"\nNegative prompt: {params['negative_prompt']}"
    return f"{text}\n{line}"


def generation_pnginfo(params: dict) -> PngImagePlugin.PngInfo:
    """PNG text chunks describing one generated image (pass to ``Image.save(pnginfo=...)``).

    Writes the sd-scripts keys for the parameters present (``raw-prompt`` only when it differs
    from ``prompt``), the A1111 ``parameters`` text and the ``sdxl-trainer`` JSON of all of
    ``params``. Values that are not Latin-1 are stored as UTF-8 (iTXt) chunks.
    """
    info = PngImagePlugin.PngInfo()
    for name, key, _ in _SD_SCRIPTS_KEYS:
        value = params.get(name)
        if value is None or (name == "raw_prompt" and value == params.get("prompt")):
            continue
        info.add_text(key, str(value))
    info.add_text(A1111_KEY, a1111_infotext(params))
    info.add_text(
        TRAINER_KEY, json.dumps(params, default=_jsonable, ensure_ascii=False, sort_keys=True)
    )
    return info


def read_png_text(png_path: str | Path) -> dict[str, str]:
    """All text chunks (tEXt, zTXt, iTXt) of a PNG file; :class:`UserError` if it is unreadable."""
    try:
        with Image.open(png_path) as image:  # .text reads chunks after the image data too
            return {str(k): str(v) for k, v in getattr(image, "text", {}).items()}
    except FileNotFoundError:
        raise UserError(f"image not found: {png_path}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise UserError(f"cannot read image {png_path}: {exc}") from None


def _split_a1111_fields(line: str) -> dict[str, str]:
    """``Key: value, Key: "quoted, value"`` -> dict."""
    result = {}
    pattern = r'\s*([\w .+-]+):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)'
    for match in re.finditer(pattern, line):
        key, value = match.group(1).strip(), match.group(2).strip()
        if value.startswith('"'):
            try:
                value = json.loads(value)
            except ValueError:
                pass
        result[key] = value
    return result


def parse_a1111_infotext(text: str) -> dict[str, Any]:
    """Read A1111's ``parameters`` text back into parameter names (unknown keys are dropped)."""
    lines = text.rstrip("\n").split("\n")
    fields = {}
    if len(lines) > 1 and re.match(r"^\s*[\w .+-]+: ", lines[-1]) and "Steps:" in lines[-1]:
        fields = _split_a1111_fields(lines.pop())
    prompt_lines, negative_lines, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].lstrip()
        (negative_lines if in_negative else prompt_lines).append(line)
    params: dict[str, Any] = {"prompt": "\n".join(prompt_lines)}
    if in_negative:
        params["negative_prompt"] = "\n".join(negative_lines)
    for key, (name, kind) in _A1111_READ.items():
        if key in fields:
            try:
                params[name] = kind(fields[key])
            except ValueError:
                pass
    size = re.fullmatch(r"(\d+)x(\d+)", fields.get("Size", ""))
    if size:
        params["width"], params["height"] = int(size.group(1)), int(size.group(2))
    return params


def read_generation_params(png_path: str | Path) -> dict[str, Any]:
    """Read generation parameters back from a PNG written with :func:`generation_pnginfo`.

    Our ``sdxl-trainer`` JSON is returned as is when present (the exact parameters; tuples come
    back as lists). Otherwise images from sd-scripts (its per-key chunks) and A1111
    (``parameters``) are read, numbers converted to ``int``/``float``; the sd-scripts keys win.
    """
    text = read_png_text(png_path)
    if TRAINER_KEY in text:
        try:
            ours = json.loads(text[TRAINER_KEY])
        except ValueError:
            raise UserError(f"{png_path}: the '{TRAINER_KEY}' metadata is not valid JSON") from None
        if isinstance(ours, dict):
            return ours
    params: dict[str, Any] = {}
    if A1111_KEY in text:
        params.update(parse_a1111_infotext(text[A1111_KEY]))
    for name, key, kind in _SD_SCRIPTS_KEYS:
        if key in text:
            try:
                params[name] = kind(text[key])
            except ValueError:
                params[name] = text[key]
    return params
