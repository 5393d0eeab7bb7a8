"""The dataset configuration: sd-scripts' dataset TOML (or JSON) and DreamBooth folders.

A config has three levels, ``[general]`` -> ``[[datasets]]`` -> ``[[datasets.subsets]]``; a value
set at a lower level overrides the one above, and command-line values (``cli_defaults``) sit
below ``[general]``. The result is a list of :class:`DatasetConfig`, each holding its
:class:`SubsetConfig` list with every inherited value resolved. Mistakes (unknown keys, wrong
types, impossible bucket settings) raise :class:`UserError` naming the file, the section and
the key.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

from library.errors import UserError

logger = logging.getLogger(__name__)

DREAMBOOTH, FINETUNE, CONTROLNET = "dreambooth", "finetune", "controlnet"

#: Command-line option names that have a different name in the dataset config.
CLI_TO_CONFIG_NAMES = {"train_batch_size": "batch_size", "dataset_repeats": "num_repeats"}
#: Options that exist only on the command line / in --config_file, never in a dataset config.
ARGPARSE_ONLY_KEYS = ("debug_dataset", "max_token_length", "prior_loss_weight")


@dataclass
class SubsetConfig:
    """One folder (DreamBooth / ControlNet) or metadata file (fine-tuning) with its options."""

    image_dir: Optional[str] = None
    metadata_file: Optional[str] = None
    conditioning_data_dir: Optional[str] = None
    num_repeats: int = 1
    is_reg: bool = False
    class_tokens: Optional[str] = None
    caption_extension: str = ".caption"
    cache_info: bool = False
    alpha_mask: bool = False
    shuffle_caption: bool = False
    caption_separator: str = ","
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    secondary_separator: Optional[str] = None
    enable_wildcard: bool = False
    caption_prefix: Optional[str] = None
    caption_suffix: Optional[str] = None
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    token_warmup_min: int = 1
    token_warmup_step: float = 0
    color_aug: bool = False
    flip_aug: bool = False
    random_crop: bool = False
    face_crop_aug_range: Optional[tuple[float, float]] = None
    custom_attributes: dict = field(default_factory=dict)
    resize_interpolation: Optional[str] = None

    @property
    def kind(self) -> str:
        """``"finetune"`` (has metadata_file), ``"controlnet"`` (has conditioning_data_dir) or
        ``"dreambooth"``."""
        if self.metadata_file is not None:
            return FINETUNE
        if self.conditioning_data_dir is not None:
            return CONTROLNET
        return DREAMBOOTH


@dataclass
class DatasetConfig:
    """One dataset: its resolution, batch size, bucketing settings and subsets.

    ``min_bucket_reso``/``max_bucket_reso`` are stored already snapped to ``bucket_reso_steps``.
    """

    resolution: tuple[int, int]
    subsets: list[SubsetConfig] = field(default_factory=list)
    batch_size: int = 1
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    network_multiplier: float = 1.0
    validation_seed: Optional[int] = None
    validation_split: float = 0.0
    resize_interpolation: Optional[str] = None

    @property
    def kind(self) -> str:
        """The kind shared by all subsets (see :attr:`SubsetConfig.kind`)."""
        return self.subsets[0].kind if self.subsets else DREAMBOOTH


# Which keys go where. "Inheritable" subset keys may also be set in [general] / [[datasets]].
_SUBSET_ONLY = ("image_dir", "metadata_file", "conditioning_data_dir", "is_reg")
_SUBSET_KEYS = tuple(f.name for f in fields(SubsetConfig))
_INHERITABLE = tuple(k for k in _SUBSET_KEYS if k not in _SUBSET_ONLY)
_DATASET_KEYS = tuple(f.name for f in fields(DatasetConfig) if f.name != "subsets")
_GENERAL_ALLOWED = frozenset(_DATASET_KEYS + _INHERITABLE)
_DATASET_ALLOWED = _GENERAL_ALLOWED | {"subsets"}
_SUBSET_ALLOWED = frozenset(_SUBSET_KEYS)
#: Subset keys that only make sense for some subset kinds (checked where set in a subset).
_KIND_ONLY = {
    "class_tokens": (DREAMBOOTH, CONTROLNET),
    "is_reg": (DREAMBOOTH,),
    "caption_extension": (DREAMBOOTH, CONTROLNET),
    "cache_info": (DREAMBOOTH, CONTROLNET),
    "alpha_mask": (DREAMBOOTH, FINETUNE),
}
_KIND_LABEL = {DREAMBOOTH: "a DreamBooth subset (image_dir only)",
               FINETUNE: "a fine-tuning subset (one with metadata_file)",
               CONTROLNET: "a ControlNet subset (one with conditioning_data_dir)"}


_CONFIG_TO_CLI_NAMES = {v: k for k, v in CLI_TO_CONFIG_NAMES.items()}
_MISSING = object()
_INTERPOLATIONS = ("lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area")


class _ValueProblem(Exception):
    """A value of the wrong type or out of range (the message says what was expected)."""


def _as_bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _ValueProblem("expected true or false")
    return value


def _as_str(value: Any) -> str:
    if not isinstance(value, str):
        raise _ValueProblem("expected a string in quotes")
    return value


def _as_int(low: Optional[int] = None) -> Any:
    def convert(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _ValueProblem("expected a whole number such as 10")
        if low is not None and value < low:
            raise _ValueProblem(f"must be at least {low}")
        return value
    return convert


def _as_float(low: float = float("-inf"), high: float = float("inf"),
              high_open: bool = False) -> Any:
    def convert(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _ValueProblem("expected a number such as 0.1")
        if value < low or value > high or (high_open and value == high):
            upper = f"below {high:g}" if high_open else f"at most {high:g}"
            raise _ValueProblem(f"must be at least {low:g} and {upper}")
        return float(value)
    return convert


def _numbers(value: Any, kind: type, what: str) -> list:
    if isinstance(value, str):
        try:
            return [kind(part) for part in value.replace("x", ",").split(",")]
        except ValueError:
            raise _ValueProblem(f"expected {what}") from None
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in items) or (
            kind is int and any(not float(v).is_integer() for v in items)):
        raise _ValueProblem(f"expected {what}")
    return [kind(v) for v in items]


def _as_resolution(value: Any) -> tuple[int, int]:
    what = "a size in pixels: 1024 or [1024, 768] (width, height)"
    sides = _numbers(value, int, what)
    if len(sides) == 1:
        sides = sides * 2
    if len(sides) != 2 or min(sides) <= 0:
        raise _ValueProblem(f"expected {what}")
    return sides[0], sides[1]


def _as_range(value: Any) -> tuple[float, float]:
    what = "two numbers [low, high], e.g. [2.0, 4.0]"
    pair = _numbers(value, float, what)
    if len(pair) != 2 or not 0 < pair[0] <= pair[1]:
        raise _ValueProblem(f"expected {what} with 0 < low <= high")
    return pair[0], pair[1]


def _as_table(value: Any) -> dict:
    if not isinstance(value, Mapping):
        raise _ValueProblem("expected a table, e.g. custom_attributes = { key = \"value\" }")
    return dict(value)


def _as_separator(value: Any) -> str:
    if not _as_str(value):
        raise _ValueProblem("must not be empty")
    return value


def _as_interpolation(value: Any) -> str:
    if not isinstance(value, str) or value.lower() not in _INTERPOLATIONS:
        raise _ValueProblem(f"expected one of {', '.join(_INTERPOLATIONS)}")
    return value.lower()


_CONVERTERS: dict[str, Any] = {
    **{k: _as_str for k in ("image_dir", "metadata_file", "conditioning_data_dir",
                            "class_tokens", "caption_extension", "keep_tokens_separator",
                            "secondary_separator", "caption_prefix", "caption_suffix")},
    **{k: _as_bool for k in ("is_reg", "cache_info", "alpha_mask", "shuffle_caption",
                             "enable_wildcard", "color_aug", "flip_aug", "random_crop",
                             "enable_bucket", "bucket_no_upscale")},
    "caption_separator": _as_separator,
    "num_repeats": _as_int(),
    "keep_tokens": _as_int(0),
    "caption_dropout_every_n_epochs": _as_int(0),
    "token_warmup_min": _as_int(0),
    "batch_size": _as_int(1),
    "min_bucket_reso": _as_int(1),
    "max_bucket_reso": _as_int(1),
    "bucket_reso_steps": _as_int(1),
    "validation_seed": _as_int(),
    "caption_dropout_rate": _as_float(0.0, 1.0),
    "caption_tag_dropout_rate": _as_float(0.0, 1.0),
    "token_warmup_step": _as_float(0.0),
    "network_multiplier": _as_float(),
    "validation_split": _as_float(0.0, 1.0, high_open=True),
    "face_crop_aug_range": _as_range,
    "custom_attributes": _as_table,
    "resize_interpolation": _as_interpolation,
    "resolution": _as_resolution,
}


class _Source:
    """Where values come from, for messages: a file (and section) or the command line."""

    def __init__(self, file: Optional[str]) -> None:
        self.file = file

    def at(self, section: str) -> str:
        return f"{section} of {self.file}" if self.file else "the command-line dataset options"

    def key(self, key: str, section: str) -> str:
        if self.file:
            return f"{key} in {section} of {self.file}"
        return f"--{_CONFIG_TO_CLI_NAMES.get(key, key)}"

    def bad_value(self, key: str, value: Any, section: str, problem: str) -> UserError:
        if self.file:
            return UserError(f"{key} = {value!r} in {section} of {self.file}: {problem}")
        return UserError(f"--{_CONFIG_TO_CLI_NAMES.get(key, key)} {value!r}: {problem}")


def _check_keys(table: Mapping[str, Any], allowed: Iterable[str], section: str,
                src: _Source) -> None:
    allowed = frozenset(allowed)
    for key in table:
        if key in allowed:
            continue
        where = src.at(section)
        if key in CLI_TO_CONFIG_NAMES:
            hint = (f"'{key}' is the command-line name; in a dataset config write "
                    f"'{CLI_TO_CONFIG_NAMES[key]}'")
        elif key in ARGPARSE_ONLY_KEYS:
            hint = (f"'{key}' is a command-line option: pass --{key} or put it in the "
                    "--config_file TOML, not in the dataset config")
        elif key in _SUBSET_ONLY:
            hint = f"'{key}' belongs in a [[datasets.subsets]] table"
        elif key in _DATASET_KEYS and section.startswith("[[datasets.subsets]]"):
            hint = f"'{key}' is a dataset option: move it to [[datasets]] or [general]"
        elif key in ("general", "datasets", "subsets"):
            hint = f"a '{key}' table is not allowed here"
        else:
            close = difflib.get_close_matches(str(key), sorted(allowed), n=1, cutoff=0.6)
            hint = f"did you mean '{close[0]}'?" if close else "remove it (see docs/datasets.md)"
        raise UserError(f"unknown key '{key}' in {where}: {hint}")


def _convert_table(table: Mapping[str, Any], section: str, src: _Source) -> dict[str, Any]:
    """Type-check and convert every (known) key of one table; None values count as unset."""
    out: dict[str, Any] = {}
    for key, value in table.items():
        if value is None or key == "subsets":
            continue
        try:
            out[key] = _CONVERTERS[key](value)
        except _ValueProblem as problem:
            raise src.bad_value(key, value, section, str(problem)) from None
    return out


def _pick(name: str, layers: list[dict[str, Any]], default: Any) -> Any:
    for layer in layers:
        if name in layer:
            return layer[name]
    return default


def _build_subset(raw: dict[str, Any], layers: list[dict[str, Any]], section: str,
                  src: _Source) -> SubsetConfig:
    kwargs = {f.name: _pick(f.name, [raw] + layers, _MISSING) for f in fields(SubsetConfig)}
    subset = SubsetConfig(**{k: v for k, v in kwargs.items() if v is not _MISSING})
    subset.custom_attributes = dict(subset.custom_attributes)
    if subset.metadata_file is not None and subset.conditioning_data_dir is not None:
        raise UserError(f"{src.at(section)} has both metadata_file and conditioning_data_dir; "
                        "a subset is either fine-tuning or ControlNet")
    for key, kinds in _KIND_ONLY.items():
        if key in raw and subset.kind not in kinds:
            raise UserError(f"{src.key(key, section)} is not used by {_KIND_LABEL[subset.kind]}; "
                            "remove it")
    if subset.kind != FINETUNE and subset.image_dir is None:
        raise UserError(f"{src.at(section)} has no image_dir: every subset needs "
                        "image_dir (or metadata_file for fine-tuning)")
    return subset


def _snap_bucket_range(ds: DatasetConfig, section: str, src: _Source) -> None:
    step = ds.bucket_reso_steps
    if step % 32 != 0:
        raise src.bad_value("bucket_reso_steps", step, section,
                            "SDXL needs a multiple of 32 (the U-Net downsamples the 8x latent "
                            "twice); use 64 (the default) or 32")
    if not ds.enable_bucket or ds.bucket_no_upscale:
        return
    low = ds.min_bucket_reso - ds.min_bucket_reso % step
    high = -(-ds.max_bucket_reso // step) * step
    if (low, high) != (ds.min_bucket_reso, ds.max_bucket_reso):
        logger.warning("%s: min/max_bucket_reso %d/%d snapped to multiples of bucket_reso_steps "
                       "(%d): %d/%d", src.at(section), ds.min_bucket_reso, ds.max_bucket_reso,
                       step, low, high)
    ds.min_bucket_reso, ds.max_bucket_reso = max(low, step), high
    width, height = ds.resolution
    if min(width, height) < ds.min_bucket_reso:
        raise UserError(f"{src.at(section)}: min_bucket_reso = {ds.min_bucket_reso} is larger "
                        f"than the resolution's short side ({width}x{height}); lower it")
    if max(width, height) > ds.max_bucket_reso:
        raise UserError(f"{src.at(section)}: max_bucket_reso = {ds.max_bucket_reso} is smaller "
                        f"than the resolution's long side ({width}x{height}); raise it "
                        "(2048 is usual for SDXL)")
    from library.data.buckets import max_bucket_warning  # here: keeps imports one-way at load

    warning = max_bucket_warning(ds.resolution, ds.max_bucket_reso, step)
    if warning:
        logger.warning("%s: %s", src.at(section), warning)


def _validate_dataset(ds: DatasetConfig, section: str, src: _Source,
                      allowed_kinds: Optional[Iterable[str]]) -> None:
    kinds = {subset.kind for subset in ds.subsets}
    if len(kinds) > 1:
        raise UserError(
            f"{src.at(section)} mixes subsets with and without metadata_file / "
            "conditioning_data_dir; put DreamBooth, fine-tuning and ControlNet subsets in "
            "separate [[datasets]]")
    if allowed_kinds is not None and kinds and not kinds <= set(allowed_kinds):
        raise UserError(f"{src.at(section)} is a {ds.kind} dataset, which this script does not "
                        f"train on (it takes: {', '.join(sorted(allowed_kinds))})")
    _snap_bucket_range(ds, section, src)
    if not ds.enable_bucket and (ds.resolution[0] % 32 or ds.resolution[1] % 32):
        raise UserError(f"{src.at(section)}: resolution {ds.resolution[0]}x{ds.resolution[1]} "
                        "must be a multiple of 32 per side when bucketing is off")


def _drop_unusable_subsets(ds: DatasetConfig, section: str, src: _Source) -> None:
    """Drop subsets with num_repeats < 1 and duplicates of an earlier subset (with a warning)."""
    kept: list[SubsetConfig] = []
    seen: set[tuple] = set()
    for subset in ds.subsets:
        ident = (subset.kind, _norm(subset.image_dir), _norm(subset.metadata_file),
                 _norm(subset.conditioning_data_dir))
        if subset.num_repeats < 1:
            logger.warning("%s: ignoring subset %s because num_repeats = %d < 1", src.at(section),
                           subset.image_dir or subset.metadata_file, subset.num_repeats)
        elif ident in seen:
            logger.warning("%s: ignoring duplicate subset %s", src.at(section),
                           subset.image_dir or subset.metadata_file)
        else:
            seen.add(ident)
            kept.append(subset)
    ds.subsets = kept


def _norm(path: Optional[str]) -> Optional[str]:
    return os.path.normpath(os.path.expanduser(path)) if path is not None else None


def _check_paths(ds: DatasetConfig, section: str, src: _Source) -> None:
    for subset in ds.subsets:
        for key in ("image_dir", "conditioning_data_dir"):
            value = getattr(subset, key)
            if value is not None and not os.path.isdir(os.path.expanduser(value)):
                raise UserError(f"{src.key(key, section)}: folder '{value}' does not exist")
        if subset.metadata_file is not None and not os.path.isfile(
                os.path.expanduser(subset.metadata_file)):
            raise UserError(f"{src.key('metadata_file', section)}: file "
                            f"'{subset.metadata_file}' does not exist")


def cli_values_to_config(values: Mapping[str, Any]) -> dict[str, Any]:
    """Command-line option values -> dataset-config values: renames ``train_batch_size`` and
    ``dataset_repeats``, applies the ``caption_extention`` alias, drops None values and options
    that are not dataset keys."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = CLI_TO_CONFIG_NAMES.get(key, key)
        if value is not None and name in _GENERAL_ALLOWED:
            out[name] = value
    if values.get("caption_extention") is not None:
        out["caption_extension"] = values["caption_extention"]
    return out


def build_dataset_configs(document: Mapping[str, Any], *, file: Optional[str] = None,
                          cli_defaults: Optional[Mapping[str, Any]] = None,
                          allowed_kinds: Optional[Iterable[str]] = None,
                          check_paths: bool = True) -> list[DatasetConfig]:
    """Validate a parsed dataset config (``{"general": {...}, "datasets": [...]}``).

    ``file`` names the source in messages (None: the values came from the command line);
    ``cli_defaults`` are command-line values (argparse names are fine), used below ``[general]``.
    """
    src = _Source(file)
    if not isinstance(document, Mapping):
        raise UserError(f"{src.at('the top level')}: expected a table with [general] and "
                        "[[datasets]]")
    _check_keys(document, ("general", "datasets"), "the top level", src)
    general_raw = document.get("general", {})
    datasets_raw = document.get("datasets", [])
    if not isinstance(general_raw, Mapping):
        raise UserError(f"{src.at('[general]')}: 'general' must be a table ([general])")
    if not isinstance(datasets_raw, list) or not all(isinstance(d, Mapping) for d in datasets_raw):
        raise UserError(f"{src.at('the top level')}: 'datasets' must be an array of tables "
                        "([[datasets]])")
    if not datasets_raw:
        raise UserError(f"{src.at('the top level')} defines no [[datasets]]")
    _check_keys(general_raw, _GENERAL_ALLOWED, "[general]", src)
    general = _convert_table(general_raw, "[general]", src)
    cli = _convert_table(cli_values_to_config(cli_defaults or {}), "command-line defaults",
                         _Source(None))
    result = [_build_dataset(raw, i + 1, general, cli, src, allowed_kinds, check_paths)
              for i, raw in enumerate(datasets_raw)]
    if not any(ds.subsets for ds in result):
        raise UserError(f"{src.at('the config')}: no usable subsets (all have num_repeats < 1)")
    return result


def _build_dataset(raw: Mapping[str, Any], number: int, general: dict, cli: dict, src: _Source,
                   allowed_kinds: Optional[Iterable[str]], check_paths: bool) -> DatasetConfig:
    section = f"[[datasets]] #{number}"
    _check_keys(raw, _DATASET_ALLOWED, section, src)
    dataset_values = _convert_table(raw, section, src)
    layers = [dataset_values, general, cli]
    kwargs = {name: _pick(name, layers, _MISSING) for name in _DATASET_KEYS}
    if kwargs["resolution"] is _MISSING:
        raise UserError(f"{src.at(section)}: no resolution; set resolution = 1024 (or "
                        "[1024, 1024]) in [general] or [[datasets]], or pass --resolution")
    subsets_raw = raw.get("subsets", [])
    if not isinstance(subsets_raw, list) or not all(isinstance(s, Mapping) for s in subsets_raw):
        raise UserError(f"{src.at(section)}: 'subsets' must be an array of tables "
                        "([[datasets.subsets]])")
    if not subsets_raw:
        raise UserError(f"{src.at(section)} has no [[datasets.subsets]]; add at least one "
                        "with image_dir (or metadata_file)")
    subsets = []
    for j, sub_raw in enumerate(subsets_raw):
        sub_section = f"[[datasets.subsets]] #{j + 1} of dataset #{number}"
        _check_keys(sub_raw, _SUBSET_ALLOWED, sub_section, src)
        converted = _convert_table(sub_raw, sub_section, src)
        subsets.append(_build_subset(converted, layers, sub_section, src))
    ds = DatasetConfig(subsets=subsets, **{k: v for k, v in kwargs.items() if v is not _MISSING})
    _validate_dataset(ds, section, src, allowed_kinds)
    _drop_unusable_subsets(ds, section, src)
    if check_paths:
        _check_paths(ds, section, src)
    return ds


def read_config_document(path: str | Path) -> dict[str, Any]:
    """Parse a dataset config file: JSON if it ends in ``.json``, TOML otherwise."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"dataset config {path} does not exist (--dataset_config)") from None
    except OSError as exc:
        raise UserError(f"cannot read dataset config {path}: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"dataset config {path} is not UTF-8 text; re-save it as UTF-8") from None
    if path.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"dataset config {path} is not valid JSON: {exc}") from None
    import tomllib

    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"dataset config {path} is not valid TOML: {exc}") from None


def load_dataset_config(path: str | Path, cli_defaults: Optional[Mapping[str, Any]] = None, *,
                        allowed_kinds: Optional[Iterable[str]] = None,
                        check_paths: bool = True) -> list[DatasetConfig]:
    """Load and validate a dataset config TOML (or ``.json``) file.

    ``cli_defaults``: command-line values (argparse names), used where the file sets nothing.
    ``allowed_kinds``: the dataset kinds the calling script trains on (None = any).
    ``check_paths``: require every image_dir / metadata_file / conditioning_data_dir to exist.
    """
    document = read_config_document(path)
    if cli_defaults:
        ignored = [k for k in ("train_data_dir", "reg_data_dir", "in_json") if cli_defaults.get(k)]
        if ignored:
            logger.warning("--%s ignored: the dataset config %s defines the data",
                           ", --".join(ignored), path)
    return build_dataset_configs(document, file=str(path), cli_defaults=cli_defaults,
                                 allowed_kinds=allowed_kinds, check_paths=check_paths)
