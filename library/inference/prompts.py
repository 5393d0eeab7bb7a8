"""Prompts for sampling and generation: inline options, prompt files, dynamic prompts.

Independent pieces, all compatible with what sd-scripts users already write (the A1111 attention
weights ``(word:1.3)`` live below training and inference, in :mod:`library.text.attention`):

* **Inline options** appended to a prompt and separated by `` --`` (``a cat --w 1024 --n blurry``),
  parsed by :func:`parse_prompt_line` into a :class:`PromptSpec` whose unset fields stay ``None`` so
  the caller decides the defaults (:meth:`PromptSpec.with_defaults`).
* **Prompt files** (``--sample_prompts`` / ``--from_file``): ``.txt``, ``.toml`` and ``.json``,
  read by :func:`load_prompt_file`.
* **Dynamic prompts** ``{a|b}`` and enumeration ``{e$$a|b}``: :func:`expand_dynamic_prompts`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from library.errors import UserError

logger = logging.getLogger(__name__)

# ---- Prompt specification and inline options -----------------------------------------------------


@dataclass
class PromptSpec:
    """One prompt and the per-prompt settings given with it; ``None`` means "use the default".

    Field names follow the sd-scripts command-line options they override (``--W``/``--H`` are
    ``width``/``height``, ``--steps`` is ``steps``, ``--ds_depth_1`` is ``ds_depth_1`` ...).
    ``seeds`` holds every seed of ``--d 1,2,3`` (one image per seed); ``no_negative_scale`` is set
    by ``--nl none``, which switches a global ``--negative_scale`` off for this prompt.
    ``raw_prompt`` is the line as written, options included.
    """

    prompt: str = ""
    negative_prompt: Optional[str] = None
    width: Optional[int] = None
    height: Optional[int] = None
    original_width: Optional[int] = None
    original_height: Optional[int] = None
    original_width_negative: Optional[int] = None
    original_height_negative: Optional[int] = None
    crop_top: Optional[int] = None
    crop_left: Optional[int] = None
    steps: Optional[int] = None
    seeds: Optional[list[int]] = None
    scale: Optional[float] = None
    negative_scale: Optional[float] = None
    no_negative_scale: bool = False
    strength: Optional[float] = None
    network_multipliers: Optional[list[float]] = None
    sampler: Optional[str] = None
    clip_prompt: Optional[str] = None
    ds_depth_1: Optional[int] = None
    ds_timesteps_1: Optional[int] = None
    ds_depth_2: Optional[int] = None
    ds_timesteps_2: Optional[int] = None
    ds_ratio: Optional[float] = None
    gradual_latent_timesteps: Optional[int] = None
    gradual_latent_ratio: Optional[float] = None
    gradual_latent_every_n_steps: Optional[int] = None
    gradual_latent_ratio_step: Optional[float] = None
    gradual_latent_s_noise: Optional[float] = None
    gradual_latent_unsharp_params: Optional[str] = None
    controlnet_image: Optional[str] = None
    raw_prompt: Optional[str] = None

    @property
    def seed(self) -> Optional[int]:
        """The first seed, or ``None`` when no seed was given."""
        return self.seeds[0] if self.seeds else None

    def with_defaults(
        self, *, width: int = 512, height: int = 512, steps: int = 30, scale: float = 7.5,
        negative_prompt: str = "", negative_scale: Optional[float] = None,
        seed: Optional[int] = None, sampler: Optional[str] = "ddim",
        strength: Optional[float] = None, network_multipliers: Optional[Sequence[float]] = None,
        original_width: Optional[int] = None, original_height: Optional[int] = None,
        original_width_negative: Optional[int] = None,
        original_height_negative: Optional[int] = None, crop_top: int = 0, crop_left: int = 0,
    ) -> "PromptSpec":
        """Return a copy with unset fields filled from the arguments and sizes/steps made valid.

        Width and height are rounded down to a multiple of 8 (at least 64) and steps clamped to
        1..1000, as sd-scripts does. The original (micro-conditioning) size defaults to the
        argument, else to the final target size; the negative original size defaults to the
        positive one. ``seeds`` stays ``None`` when neither the prompt nor ``seed`` gives one (the
        caller draws a random seed).
        """
        out = dataclasses.replace(self, seeds=list(self.seeds) if self.seeds else self.seeds)
        out.width = _round_size(_first(self.width, width))
        out.height = _round_size(_first(self.height, height))
        out.steps = max(1, min(1000, int(_first(self.steps, steps))))
        out.scale = float(_first(self.scale, scale))
        out.negative_prompt = _first(self.negative_prompt, negative_prompt)
        if not self.no_negative_scale:
            out.negative_scale = _first(self.negative_scale, negative_scale)
        out.sampler = _first(self.sampler, sampler)
        out.strength = _first(self.strength, strength)
        if self.network_multipliers is None and network_multipliers is not None:
            out.network_multipliers = [float(m) for m in network_multipliers]
        if self.seeds is None and seed is not None:
            out.seeds = [int(seed)]
        out.original_width = _first(self.original_width, original_width, out.width)
        out.original_height = _first(self.original_height, original_height, out.height)
        out.original_width_negative = _first(
            self.original_width_negative, original_width_negative, out.original_width)
        out.original_height_negative = _first(
            self.original_height_negative, original_height_negative, out.original_height)
        out.crop_top = _first(self.crop_top, crop_top)
        out.crop_left = _first(self.crop_left, crop_left)
        return out


def _first(*values: Any) -> Any:
    """The first value that is not ``None`` (or ``None``)."""
    for value in values:
        if value is not None:
            return value
    return None


def _round_size(value: int) -> int:
    """Round a pixel size down to a multiple of 8, at least 64."""
    value = int(value)
    return max(64, value - value % 8)


def _to_int(text: str) -> int:
    return int(text.strip())


def _to_float(text: str) -> float:
    value = float(text.strip())
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError("not a finite number")
    return value


def _split_list(text: str) -> list[str]:
    items = [item for item in re.split(r"[,\s]+", text.strip()) if item]
    if not items:
        raise ValueError("empty list")
    return items


def _to_int_list(text: str) -> list[int]:
    return [int(item) for item in _split_list(text)]


def _to_float_list(text: str) -> list[float]:
    return [_to_float(item) for item in _split_list(text)]


def _to_strength(text: str) -> float:
    value = _to_float(text)
    if not 0.0 <= value <= 1.0:
        raise ValueError("must be between 0 and 1")
    return value


def _to_text(text: str) -> str:
    return text.strip()


def _to_sampler(text: str) -> str:
    from library.inference.samplers import canonical_sampler_name

    try:
        return canonical_sampler_name(text)
    except UserError:
        raise ValueError("unknown sampler") from None


_KIND_WORDS = {
    _to_int: "an integer",
    _to_float: "a number",
    _to_int_list: "a comma-separated list of integers",
    _to_float_list: "a comma-separated list of numbers",
    _to_strength: "a number between 0 and 1",
    _to_sampler: "a sampler name (see --sample_sampler for the choices)",
}

# inline option name -> (PromptSpec field, converter); --nl is handled separately ("none")
_OPTIONS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "w": ("width", _to_int),
    "h": ("height", _to_int),
    "ow": ("original_width", _to_int),
    "oh": ("original_height", _to_int),
    "nw": ("original_width_negative", _to_int),
    "nh": ("original_height_negative", _to_int),
    "ct": ("crop_top", _to_int),
    "cl": ("crop_left", _to_int),
    "s": ("steps", _to_int),
    "d": ("seeds", _to_int_list),
    "l": ("scale", _to_float),
    "nl": ("negative_scale", _to_float),
    "t": ("strength", _to_strength),
    "n": ("negative_prompt", _to_text),
    "c": ("clip_prompt", _to_text),
    "am": ("network_multipliers", _to_float_list),
    "ss": ("sampler", _to_sampler),
    "dsd1": ("ds_depth_1", _to_int),
    "dst1": ("ds_timesteps_1", _to_int),
    "dsd2": ("ds_depth_2", _to_int),
    "dst2": ("ds_timesteps_2", _to_int),
    "dsr": ("ds_ratio", _to_float),
    "glt": ("gradual_latent_timesteps", _to_int),
    "glr": ("gradual_latent_ratio", _to_float),
    "gle": ("gradual_latent_every_n_steps", _to_int),
    "gls": ("gradual_latent_ratio_step", _to_float),
    "glsn": ("gradual_latent_s_noise", _to_float),
    "glus": ("gradual_latent_unsharp_params", _to_text),
    "cn": ("controlnet_image", _to_text),
}

_OPTION_SPLIT = re.compile(r"(?:^|\s)--(?=[A-Za-z])")
_OPTION_CHUNK = re.compile(r"([A-Za-z][A-Za-z0-9_]*)(?:\s+(.*))?\s*$", re.S)


def _convert(converter: Callable[[str], Any], value: str, what: str, where: str) -> Any:
    """Run ``converter`` on ``value``; a failure becomes a :class:`UserError` naming ``what``."""
    try:
        return converter(value)
    except ValueError:
        kind = _KIND_WORDS.get(converter, "a valid value")
        raise UserError(f"{where}{what}: expected {kind}, got {value.strip()!r}") from None


def _apply_option(spec: PromptSpec, name: str, value: str, where: str) -> None:
    """Set the field of inline option ``--name value`` on ``spec`` (``name`` lower-case)."""
    if name == "nl" and value.strip().lower() == "none":
        spec.negative_scale = None
        spec.no_negative_scale = True
        return
    field, converter = _OPTIONS[name]
    if converter is not _to_text and not value.strip():
        raise UserError(f"{where}prompt option --{name} needs a value")
    setattr(spec, field, _convert(converter, value, f"prompt option --{name}", where))
    if name == "nl":
        spec.no_negative_scale = False


def parse_prompt_line(line: str, source: Optional[str] = None) -> PromptSpec:
    """Parse one prompt with inline options (``a cat --w 1024 --h 768 --d 1,2 --n blurry``).

    The line is split on `` --`` followed by an option name; option names are case-insensitive.
    Supported: ``--w --h`` size, ``--ow --oh`` original size, ``--nw --nh`` negative original size,
    ``--ct --cl`` crop top/left, ``--s`` steps, ``--d`` seeds, ``--l`` CFG scale, ``--nl`` negative
    scale (or ``none``), ``--t`` img2img strength, ``--n`` negative prompt, ``--c`` CLIP prompt,
    ``--am`` network multipliers, ``--ss`` sampler, ``--cn`` ControlNet-LLLite guide image, and the Deep Shrink / Gradual Latent options
    ``--dsd1 --dst1 --dsd2 --dst2 --dsr --glt --glr --gle --gls --glsn --glus``. Unknown options
    are logged as warnings and ignored; a malformed value raises :class:`UserError` naming the
    option, the line and ``source`` (e.g. ``"prompts.txt:3"``) when given.
    """
    raw = line.strip()
    where = f"{source}: " if source else ""
    line_note = f" (in prompt line {raw!r})"
    parts = _OPTION_SPLIT.split(raw)
    spec = PromptSpec(prompt=parts[0].strip(), raw_prompt=raw)
    for chunk in parts[1:]:
        match = _OPTION_CHUNK.match(chunk)
        name = match.group(1).lower() if match else chunk.split(" ", 1)[0]
        if not match or name not in _OPTIONS:
            logger.warning("%sunknown prompt option --%s ignored%s", where, name, line_note)
            continue
        try:
            _apply_option(spec, name, match.group(2) or "", where)
        except UserError as exc:
            raise UserError(f"{exc}{line_note}") from None
    return spec


# ---- Prompt files --------------------------------------------------------------------------------

# extra keys accepted in .toml/.json entries besides the field names and the inline option names
_FILE_KEY_ALIASES = {
    "sample_steps": "steps",
    "sample_sampler": "sampler",
    "seed": "seeds",
    "negative": "negative_prompt",
    "cfg_scale": "scale",
    "network_mul": "network_multipliers",
    "enum": None,  # sd-scripts bookkeeping key, ignored silently
}
_FIELD_CONVERTERS = {field: conv for field, conv in _OPTIONS.values()}
_FIELD_CONVERTERS["prompt"] = _to_text


def _value_to_text(value: Any) -> str:
    """Turn a TOML/JSON value into the text form the inline converters read."""
    if isinstance(value, bool):
        raise ValueError("booleans are not accepted")
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (list, tuple)):
        return ",".join(_value_to_text(item) for item in value)
    return str(value)


def _spec_from_dict(entry: dict, where: str) -> PromptSpec:
    """Build a :class:`PromptSpec` from one prompt entry of a .toml/.json prompt file."""
    spec = PromptSpec()
    for key, value in entry.items():
        lowered = str(key).lower()
        field = _FILE_KEY_ALIASES.get(lowered, _OPTIONS.get(lowered, (lowered,))[0])
        if field is None:
            continue
        if field not in _FIELD_CONVERTERS:
            logger.warning("%sunknown prompt key %r ignored", where, key)
            continue
        if field == "negative_scale" and (value is None or str(value).strip().lower() == "none"):
            spec.negative_scale, spec.no_negative_scale = None, True
            continue
        if value is None:
            continue
        try:
            text = _value_to_text(value)
        except ValueError:
            raise UserError(f"{where}key {key!r}: {value!r} is not a valid value") from None
        setattr(spec, field, _convert(_FIELD_CONVERTERS[field], text, f"key {key!r}", where))
    if not spec.prompt:
        logger.warning("%sentry has no 'prompt' (an empty prompt is used)", where)
    spec.raw_prompt = spec.prompt
    return spec


def _entries_from_data(data: Any, path: Path) -> list[dict]:
    """The prompt entries of parsed .toml/.json data, each merged over the ``[prompt]`` defaults."""
    if isinstance(data, dict) and "prompt" in data and isinstance(data["prompt"], (dict, list)):
        data = data["prompt"]
    if isinstance(data, list):
        return _check_entries(data, path)
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a [prompt] table or a list of prompt entries")
    defaults = {k: v for k, v in data.items() if k != "subset"}
    subsets = data.get("subset")
    if subsets is None:
        if "prompt" not in data:
            raise UserError(f"{path}: no prompts found; add [[prompt.subset]] entries "
                            "with a 'prompt' key")
        return [defaults]
    if isinstance(subsets, dict):
        subsets = [subsets]
    return [{**defaults, **entry} for entry in _check_entries(subsets, path)]


def _check_entries(entries: list, path: Path) -> list[dict]:
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise UserError(f"{path}: prompt entry {index + 1} must be a table/object with a "
                            f"'prompt' key, got {type(entry).__name__}")
    return entries


def _load_structured(path: Path, text: str) -> list[PromptSpec]:
    """Read a .toml or .json prompt file's text."""
    try:
        if path.suffix.lower() == ".toml":
            import toml

            data = toml.loads(text)
        else:
            data = json.loads(text)
    except (ValueError, TypeError) as exc:  # TomlDecodeError and JSONDecodeError are ValueErrors
        raise UserError(f"{path}: cannot parse prompt file: {exc}") from None
    entries = _entries_from_data(data, path)
    return [_spec_from_dict(e, f"{path}: entry {i + 1}: ") for i, e in enumerate(entries)]


def load_prompt_file(path: str | Path) -> list[PromptSpec]:
    """Read a prompt file in any sd-scripts format and return its prompts in order.

    * ``.txt`` (or any other suffix except .toml/.json): one prompt per line with inline options;
      blank lines and lines starting with ``#`` are skipped.
    * ``.toml``: a ``[prompt]`` table of defaults plus ``[[prompt.subset]]`` entries, each with
      ``prompt`` and any of ``negative_prompt, width, height, sample_steps, scale, seed,
      sample_sampler, ...`` (every :class:`PromptSpec` field name and inline option name works).
    * ``.json``: a list of objects with the same keys (or ``{"prompt": {...}}`` like the TOML).

    Every error names the file (and the line or entry); a missing file is a :class:`UserError`.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise UserError(f"prompt file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read prompt file {path}: {exc}") from None
    if path.suffix.lower() in (".toml", ".json"):
        specs = _load_structured(path, text)
    else:
        specs = []
        for number, line in enumerate(text.splitlines(), start=1):
            stripped = line.strip()
            if stripped and not stripped.startswith("#"):
                specs.append(parse_prompt_line(stripped, source=f"{path}:{number}"))
    if not specs:
        logger.warning("prompt file %s contains no prompts", path)
    return specs
