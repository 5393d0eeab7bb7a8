"""What an sd-scripts ``--config_file`` may contain beyond the options of the script reading it.

sd-scripts puts every key of a config TOML into its argument namespace without checking it, so
the TOMLs people have (written by the kohya_ss GUI, by notebooks, by hand) carry keys no script
reads and values its argparse would refuse on the command line. This module knows those keys and
values, so :mod:`library.config.config_file` can read such a TOML with the same meaning:

* :func:`classify_keys` sorts the keys a parser does not know into options of our other scripts
  (e.g. ``text_encoder_lr`` read by ``sdxl_train.py``), keys known to be written by other tools
  (the GUI's ``epoch``, ``noise_offset_type``, ``sdxl``, options of sd-scripts' FLUX/SD3 trainers)
  and unknown keys (a typo of a real option: warned about with a "did you mean").
* :func:`toml_value_alias` maps values sd-scripts gives a meaning to although argparse would refuse
  them (``max_token_length = 75`` is the default length, ``dynamo_backend = "no"`` turns
  compilation off).
* :func:`means_unset` tells the GUI's "not set" spellings (``""``, ``[]``) apart from real values.

Nothing here imports torch: it runs while the arguments are parsed.
"""

from __future__ import annotations

import argparse
import difflib
from functools import lru_cache
from typing import Any, Iterable, Optional, Sequence

#: Keys that other tools write into sd-scripts TOMLs and no script of ours (or sd-scripts' SDXL
#: scripts) reads. ``epoch``/``noise_offset_type``/``lowvram``/``sdxl``: kohya_ss GUI fields;
#: the rest are options of sd-scripts' FLUX, SD3 and SD 1.x trainers that the GUI writes for
#: every model family.
FOREIGN_KEYS = frozenset({
    # kohya_ss GUI fields (written into its config_*.toml next to the real options)
    "epoch", "noise_offset_type", "lowvram", "sdxl", "sdxl_cache_text_encoder_outputs", "sdxl_no_half_vae",
    "stop_text_encoder_training", "learning_rate_te", "LoRA_type", "LyCORIS_preset", "additional_parameters",
    "model_list",
    "sample_dir", "sample_batch_size", "use_wandb", "train_mode", "flux1_checkbox", "sd3_checkbox",
    "save_as_bool", "save_as", "headless", "print_only", "file_path", "num_cpu_threads_per_process",
    # sd-scripts options of the FLUX / SD3 / SD 1.x trainers
    "ae", "clip_l", "clip_g", "t5xxl", "t5xxl_device", "t5xxl_dtype", "t5xxl_max_token_length",
    "apply_t5_attn_mask", "discrete_flow_shift", "model_prediction_type", "timestep_sampling",
    "guidance_scale", "split_mode", "blocks_to_swap", "single_blocks_to_swap", "double_blocks_to_swap",
    "mem_eff_save", "weighting_scheme", "logit_mean", "logit_std", "mode_scale", "save_clip",
    "save_t5xxl", "t5_dropout_rate", "clip_l_dropout_rate", "clip_g_dropout_rate",
    "pos_emb_random_crop_rate", "enable_scaled_pos_embed", "sigmoid_scale", "no_token_padding",
    "split_qkv", "train_blocks", "use_t5xxl_cache_only", "fp8_base_t5xxl",
})

#: Values sd-scripts accepts from a TOML although argparse would refuse them on the command line,
#: mapped to what they mean here. ``None`` means "the option's default" (the key is dropped).
_VALUE_ALIASES: dict[str, dict[Any, Any]] = {
    # sd-scripts: None -> 75 tokens, so 75 written out by the GUI is the default length.
    "max_token_length": {75: None, "75": None},
    # sd-scripts compiles only with --torch_compile; the GUI writes "no" for "do not compile".
    "dynamo_backend": {"no": "no", "NO": "no"},
}

#: Values that mean "turned off / default" in a TOML where argparse wants a flag.
_FLAG_WORDS = {"true": True, "false": False, "1": True, "0": False}

NO_VALUE = object()  # sentinel: "keep the option's default"


def toml_value_alias(dest: str, value: Any) -> Any:
    """The value an sd-scripts TOML value ``value`` of option ``dest`` stands for.

    Returns :data:`NO_VALUE` when it means the option's default, the replacement when there is
    one, and ``value`` itself otherwise.
    """
    table = _VALUE_ALIASES.get(dest)
    if table is None or isinstance(value, (bool, list, dict)):
        return value
    try:
        if value in table:
            replacement = table[value]
            return NO_VALUE if replacement is None else replacement
    except TypeError:
        return value
    return value



def means_unset(action: argparse.Action, value: Any) -> bool:
    """True for the TOML spellings of "not set": ``""`` for an option without a real default, of a
    numeric type, a switch or one with choices, and ``[]`` for an option whose default is None (the
    GUI writes both)."""
    if isinstance(value, str) and value.strip() == "":
        return (action.default is None or action.type in (int, float) or action.nargs == 0
                or (action.choices is not None and "" not in action.choices))
    if isinstance(value, list) and not value:
        return action.default is None and action.nargs != "+"
    return False


def flag_value(value: Any) -> Optional[bool]:
    """A TOML value for an on/off switch: booleans, 0/1 and "true"/"false"/"0"/"1"; else None."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        return _FLAG_WORDS.get(value.strip().lower())
    return None


def match_choice(choices: Sequence[Any], value: Any) -> Any:
    """``value`` spelt as one of ``choices`` when they differ only in letter case, else ``value``."""
    if isinstance(value, str) and value not in choices:
        for c in choices:
            if isinstance(c, str) and c.lower() == value.lower():
                return c
    return value


@lru_cache(maxsize=1)
def known_option_names() -> frozenset[str]:
    """The option names of every trainer and caching tool of this toolkit."""
    from library.config.args import build_trainer_parser

    names: set[str] = {"sdxl", "flux", "skip_existing"}  # the caching tools' own switches
    for script in ("train", "train_network", "train_textual_inversion", "train_control_net_lllite"):
        parser = build_trainer_parser(script)
        names.update(a.dest for a in parser._actions if a.option_strings and a.dest != "help")
    return frozenset(names)


def classify_keys(keys: Iterable[str], own: Iterable[str]) -> tuple[list[str], list[str], list[str]]:
    """Sort config keys the reading parser does not have (``own``: its option names).

    Returns ``(other_scripts, foreign, unknown)``: options of our other scripts or tools, keys of
    other tools (:data:`FOREIGN_KEYS`), and keys nobody knows (likely typos).
    """
    own = set(own)
    others, foreign, unknown = [], [], []
    for key in keys:
        if key in own:
            continue
        if key in FOREIGN_KEYS:
            foreign.append(key)
        elif key in known_option_names():
            others.append(key)
        else:
            unknown.append(key)
    return others, foreign, unknown


def suggestion(key: str, options: Sequence[str], hints: dict[str, str]) -> Optional[str]:
    """The option ``key`` is most likely a misspelling of (or a hint for a known mix-up), or None."""
    if key in hints:
        return hints[key]
    close = difflib.get_close_matches(key, list(options), n=1, cutoff=0.7)
    return close[0] if close else None
