"""``--config_file`` (read options from TOML) and ``--output_config`` (write them back).

A config file is a TOML file whose keys are option names. Keys may be grouped into any ``[section]``
tables: sections are flattened, so ``[training] learning_rate = 1e-4`` and a top-level
``learning_rate = 1e-4`` are the same. Values are checked and converted with the option's own
argparse type; an option given on the command line wins over the file.

As in sd-scripts, a key the script does not use does not stop the run: options of our other scripts
and keys other tools write (the kohya_ss GUI's ``epoch``, ``noise_offset_type``, ...) are skipped
with one info line, and an unknown key gets one warning naming it, the file and the option it is
probably a misspelling of. Values sd-scripts gives a meaning to are read with that meaning (see
:mod:`library.config.config_compat`).

A UTF-8 byte-order mark at the start is accepted, as the dataset TOML reader accepts it. A config file is
code you trust, as a command line is: ``optimizer_type`` / ``lr_scheduler_type`` name any importable class
(``module.Class``, as sd-scripts allows), which is imported and run. Read a config file from someone else
before you use it.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

from library.config import config_compat as compat
from library.config.arg_types import add_options, flag, opt
from library.errors import UserError

logger = logging.getLogger(__name__)

# Never written by --output_config (secrets and the config options themselves).
_NOT_WRITTEN = {"help", "config_file", "output_config", "wandb_api_key", "huggingface_token"}
# Ignored when found inside a config file.
_IGNORED_KEYS = {"config_file", "output_config"}
# Names users bring from the dataset TOML or elsewhere, mapped to the option they mean.
_HINTS = {
    "batch_size": "train_batch_size",
    "num_repeats": "dataset_repeats",
    "image_dir": "train_data_dir",
    "datasets": "dataset_config (this looks like a dataset config: pass it with --dataset_config)",
    "general": "dataset_config (this looks like a dataset config: pass it with --dataset_config)",
}


def _ensure_config_options(parser: argparse.ArgumentParser) -> None:
    """Make sure the parser knows --config_file and --output_config."""
    add_options(parser, [
        opt("config_file", "Read options from this TOML file; command-line options win.", type=str, default=None),
        flag("output_config", "Write the effective options to a TOML file and exit."),
    ])


def resolve_config_path(name: str) -> Optional[Path]:
    """Return the existing config file for ``name`` (tried as given, then with ``.toml``), or None."""
    candidates = [Path(name)]
    if not name.endswith(".toml"):
        candidates.append(Path(name + ".toml"))
    for c in candidates:
        if c.is_file():
            return c
    return None


def _read_toml(path: Path) -> dict[str, Any]:
    """Parse a TOML file, turning syntax errors into a one-line UserError."""
    try:
        import tomllib  # Python >= 3.11
    except ImportError:  # pragma: no cover - Python 3.10
        tomllib = None
    try:
        text = path.read_text(encoding="utf-8-sig")  # a UTF-8 byte-order mark (Windows editors) is skipped
        if tomllib is not None:
            return tomllib.loads(text)
        import toml

        return toml.loads(text)
    except OSError as exc:
        raise UserError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"config file {path} is not UTF-8 text: {exc.reason}") from None
    except Exception as exc:  # tomllib.TOMLDecodeError / toml.TomlDecodeError
        msg = " ".join(str(exc).split())
        raise UserError(f"config file {path} is not valid TOML: {msg}") from None


def flatten_sections(data: dict[str, Any], path: Path) -> dict[str, tuple[Any, str]]:
    """Flatten top-level tables into one mapping ``key -> (value, section)``.

    A key set in two places keeps the later value (as sd-scripts does) with a warning.
    """
    flat: dict[str, tuple[Any, str]] = {}
    for top_key, top_value in data.items():
        items = top_value.items() if isinstance(top_value, dict) else [(top_key, top_value)]
        section = top_key if isinstance(top_value, dict) else ""
        for key, value in items:
            if key in flat and flat[key][0] != value:
                where = f"[{flat[key][1]}]" if flat[key][1] else "the top level"
                logger.warning("config file %s sets '%s' twice (in %s and %s); the later value %r is used",
                               path, key, where, f"[{section}]" if section else "the top level", value)
            flat[key] = (value, section)
    return flat


def _report_unused_keys(unused: list[tuple[str, str]], actions: dict, path: Path, prog: str) -> None:
    """Log the keys of ``path`` this parser does not use: info for known ones, a warning per unknown key."""
    where = {k: s for k, s in unused}
    others, foreign, unknown = compat.classify_keys([k for k, _ in unused], actions)
    if others:
        logger.info("config file %s: %s not used by %s; ignored", path, ", ".join(others), prog)
    if foreign:
        logger.info("config file %s: %s written by other tools (kohya_ss GUI, other sd-scripts trainers); "
                    "ignored", path, ", ".join(foreign))
    for key in unknown:
        loc = f" (in [{where[key]}])" if where[key] else ""
        guess = compat.suggestion(key, sorted(set(actions) | compat.known_option_names()), _HINTS)
        hint = f"; did you mean '{guess}'?" if guess else ""
        logger.warning("unknown option '%s'%s in config file %s is ignored%s", key, loc, path, hint)


def _describe(action: argparse.Action) -> str:
    if action.choices is not None:
        return "one of " + ", ".join(repr(c) for c in action.choices)
    t = action.type
    kind = {int: "a whole number", float: "a number", str: "a text value", None: "a text value"}.get(
        t, f"a value for {getattr(t, '__name__', 'this option')}")
    return kind


def _convert_scalar(action: argparse.Action, value: Any) -> Any:
    """Convert one TOML scalar with the option's type; raises ValueError/TypeError/ArgumentTypeError."""
    t = action.type
    if isinstance(value, (dict, list)):
        raise TypeError("nested value")
    if t is None or t is str:
        if isinstance(value, bool):
            return "true" if value else "false"
        return value if isinstance(value, str) else str(value)
    if isinstance(value, bool):
        raise TypeError("boolean")
    if t is int:
        if isinstance(value, str):
            text = value.strip()
            try:
                return int(text)
            except ValueError:
                value = float(text)  # "2.0" as sd-scripts' GUI writes it; "2.5" fails below
        if isinstance(value, float):
            if not (math.isfinite(value) and value.is_integer()):
                raise ValueError("not whole")
            return int(value)
        return int(value)
    if t is float:
        return float(value)
    return t(value if isinstance(value, str) else str(value))


def _convert_value(action: argparse.Action, key: str, value: Any, path: Path) -> Any:
    """Check and convert a config value for ``action``: flags need booleans, nargs options get lists.

    Returns :data:`config_compat.NO_VALUE` for a value that means "not set" (``""``, ``[]``, or an
    sd-scripts alias of the default such as ``max_token_length = 75``).
    """
    value = compat.toml_value_alias(action.dest, value)
    if value is compat.NO_VALUE or compat.means_unset(action, value):
        return compat.NO_VALUE
    if action.nargs == 0:
        switch = compat.flag_value(value)
        if switch is None:
            raise UserError(f"config file {path}: '{key}' is an on/off switch and needs true or false, "
                            f"got {value!r}")
        return switch
    if action.dest in compat._VALUE_ALIASES and value in compat._VALUE_ALIASES[action.dest].values():
        return value  # an sd-scripts value with its own meaning (e.g. dynamo_backend = "no")
    is_list = action.nargs in ("*", "+") or isinstance(action.nargs, int)
    choices = action.choices
    try:
        if is_list:
            if isinstance(value, str):  # "a=1 b=2"; shlex only with quotes, so Windows paths keep their "\"
                items = shlex.split(value) if ('"' in value or "'" in value) else value.split()
            else:
                items = value if isinstance(value, list) else [value]
            converted = [_convert_scalar(action, v) for v in items]
            if action.nargs == "+" and not converted:
                raise ValueError("empty")
            if choices is not None:
                converted = [compat.match_choice(choices, v) for v in converted]
            bad = [v for v in converted if choices is not None and v not in choices]
        else:
            if isinstance(value, list) and (action.type in (None, str)) and all(
                    isinstance(v, (int, float, str)) and not isinstance(v, bool) for v in value):
                value = ",".join(str(v) for v in value)  # e.g. resolution = [1024, 1024]
            converted = _convert_scalar(action, value)
            if choices is not None:
                converted = compat.match_choice(choices, converted)
            bad = [converted] if choices is not None and converted not in choices else []
    except (ValueError, TypeError, argparse.ArgumentTypeError) as exc:
        detail = f" ({exc})" if isinstance(exc, argparse.ArgumentTypeError) else ""
        what = ("a list of " if is_list else "") + _describe(action)
        raise UserError(f"config file {path}: '{key}' needs {what}, got {value!r}{detail}") from None
    if bad:
        raise UserError(f"config file {path}: '{key}' must be {_describe(action)}, got {bad[0]!r}")
    return converted


def load_config_values(parser: argparse.ArgumentParser, path: Path) -> dict[str, Any]:
    """Read a config TOML and return ``{dest: converted value}`` for the options of ``parser``.

    Keys ``parser`` does not have are logged and skipped (see the module docstring); a value of the
    wrong type raises UserError naming the file and key.
    """
    actions = {a.dest: a for a in parser._actions if a.dest != "help" and a.option_strings}
    flat = flatten_sections(_read_toml(path), path)
    if isinstance(flat.get("datasets", (None,))[0], list):
        raise UserError(f"config file {path} has [[datasets]] tables: it looks like a dataset config; pass it "
                        "with --dataset_config")
    unused = [(k, s) for k, (_, s) in flat.items() if k not in actions and k not in _IGNORED_KEYS]
    if unused:
        _report_unused_keys(unused, actions, path, os.path.basename(parser.prog or "this script"))
    values = {}
    for k, (v, _) in flat.items():
        if k in actions and k not in _IGNORED_KEYS:
            converted = _convert_value(actions[k], k, v, path)
            if converted is not compat.NO_VALUE:
                values[k] = converted
    return values


def parse_args_with_config(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None
                           ) -> argparse.Namespace:
    """Parse ``argv`` (default: ``sys.argv[1:]``) together with its ``--config_file``.

    Values from the config file fill the namespace first; only options actually given on the command
    line override them. With ``--output_config`` the effective options are written to
    ``<output_dir>/<output_name or "config">.toml`` (or, as sd-scripts does, to the --config_file path
    when that file does not exist yet) and the process exits with status 0.
    """
    _ensure_config_options(parser)
    argv = list(sys.argv[1:] if argv is None else argv)
    ns = parser.parse_args(argv)
    target: Optional[Path] = None
    source: Optional[Path] = None
    if ns.config_file:
        source = resolve_config_path(ns.config_file)
        if source is None and ns.output_config:
            name = ns.config_file
            target = Path(name if name.endswith(".toml") else name + ".toml")
        elif source is None:
            raise UserError(f"config file not found: {ns.config_file} (also tried {ns.config_file}.toml)"
                            if not ns.config_file.endswith(".toml") else f"config file not found: {ns.config_file}")
        else:
            values = load_config_values(parser, source)
            logger.info("loaded options from %s", source)
            ns = parser.parse_args(argv, namespace=argparse.Namespace(**values))
            ns.config_file = str(source)
    if ns.output_config:
        if target is None:
            target = default_output_config_path(ns)
        if source is not None and target.resolve() == source.resolve():
            raise UserError(f"--output_config would overwrite the config file it reads ({source}); "
                            "choose another --output_dir or --output_name")
        written = write_config(parser, ns, target)
        print(f"wrote the effective options to {written}")
        raise SystemExit(0)
    return ns


def default_output_config_path(ns: argparse.Namespace) -> Path:
    """``<output_dir>/<output_name or "config">.toml``; UserError without --output_dir."""
    if not getattr(ns, "output_dir", None):
        raise UserError("--output_config needs --output_dir (the config is written to "
                        "<output_dir>/<output_name or 'config'>.toml)")
    return Path(ns.output_dir) / f"{getattr(ns, 'output_name', None) or 'config'}.toml"


def _toml_value(value: Any) -> str:
    """Format a scalar or list as TOML."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value), ensure_ascii=False)  # JSON string escapes are valid TOML escapes


def config_toml_text(parser: argparse.ArgumentParser, ns: argparse.Namespace) -> str:
    """Render the options of ``ns`` as TOML, one ``[section]`` per option group.

    Options whose value is None are left out (TOML has no null; None is every such option's default),
    as are secrets and the config options themselves.
    """
    sections: dict[str, list[str]] = {}
    seen: set[str] = set()
    for grp in parser._action_groups:
        section = "".join(c if c.isalnum() or c in "_-" else "_" for c in (grp.title or "options"))
        for action in grp._group_actions:
            dest = action.dest
            if dest in _NOT_WRITTEN or dest in seen or not action.option_strings or not hasattr(ns, dest):
                continue
            seen.add(dest)
            value = getattr(ns, dest)
            if value is None:
                continue
            if isinstance(value, os.PathLike):
                value = os.fspath(value)
            sections.setdefault(section, []).append(f"{dest} = {_toml_value(value)}")
    out = []
    for section, lines in sections.items():
        out.append(f"[{section}]")
        out.extend(lines)
        out.append("")
    return "\n".join(out)


def write_config(parser: argparse.ArgumentParser, ns: argparse.Namespace, path: Path) -> Path:
    """Write ``ns`` as a config TOML to ``path`` atomically (temporary file, then rename). Returns path."""
    path = Path(path)
    text = config_toml_text(parser, ns)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    except OSError as exc:
        raise UserError(f"cannot write config file {path}: {exc.strerror or exc}") from None
    return path
