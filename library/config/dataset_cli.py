"""The dataset described by command-line options alone (no ``--dataset_config``).

``--train_data_dir`` holds DreamBooth folders named ``<repeats>_<class tokens>`` (``10_sks dog``),
``--reg_data_dir`` the same for regularisation images, ``--in_json`` a fine-tuning metadata file.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

from library.config.dataset_toml import DatasetConfig, build_dataset_configs
from library.errors import UserError

logger = logging.getLogger(__name__)


def parse_dreambooth_folders(parent: str | Path, is_reg: bool = False) -> list[dict[str, Any]]:
    """Subset tables for the ``<repeats>_<class tokens>`` folders inside ``parent``.

    ``10_sks dog`` -> ``num_repeats = 10``, ``class_tokens = "sks dog"``. Folders whose name does
    not start with an integer and ``_`` are skipped with a warning; hidden folders silently.
    """
    parent = Path(parent)
    option = "--reg_data_dir" if is_reg else "--train_data_dir"
    if not parent.is_dir():
        raise UserError(f"{option}: folder '{parent}' does not exist")
    tables = []
    for child in sorted(parent.iterdir(), key=lambda p: p.name):
        if not child.is_dir() or child.name.startswith("."):
            continue
        prefix, _, tokens = child.name.partition("_")
        try:
            repeats = int(prefix)
        except ValueError:
            logger.warning("skipping folder '%s' in %s: its name must be '<repeats>_<class "
                           "tokens>', e.g. '10_sks dog'", child.name, option)
            continue
        table: dict[str, Any] = {"image_dir": str(child), "num_repeats": repeats}
        if tokens:
            table["class_tokens"] = tokens
        if is_reg:
            table["is_reg"] = True
        tables.append(table)
    return tables


def dataset_config_from_cli(train_data_dir: Optional[str], reg_data_dir: Optional[str],
                            in_json: Optional[str], general: Mapping[str, Any], *,
                            allowed_kinds: Optional[Iterable[str]] = None,
                            check_paths: bool = True) -> list[DatasetConfig]:
    """The dataset when no ``--dataset_config`` is given.

    With ``in_json``: one fine-tuning subset (metadata_file = in_json, image_dir =
    train_data_dir, num_repeats = dataset_repeats). With ``general["conditioning_data_dir"]``:
    ControlNet subsets, one per ``<repeats>_<name>`` folder of train_data_dir. Otherwise
    DreamBooth subsets from the folders of train_data_dir and (is_reg) reg_data_dir.
    ``general`` holds the other command-line values (argparse names).
    """
    general = dict(general)
    if in_json:
        if reg_data_dir:
            logger.warning("--reg_data_dir ignored: fine-tuning with --in_json uses no "
                           "regularisation images")
        subsets = [{"metadata_file": str(in_json), "image_dir": train_data_dir}]
        general.pop("conditioning_data_dir", None)
    else:
        if not train_data_dir:
            raise UserError("no training data: pass --train_data_dir (folders like "
                            "'10_sks dog'), --in_json, or --dataset_config")
        subsets = parse_dreambooth_folders(train_data_dir)
        if not subsets:
            raise UserError(f"--train_data_dir {train_data_dir} has no '<repeats>_<class "
                            "tokens>' sub-folders; put the images in e.g. "
                            f"'{Path(train_data_dir) / '10_sks dog'}'")
        cond_dir = general.pop("conditioning_data_dir", None)
        if cond_dir:
            for table in subsets:
                table["conditioning_data_dir"] = str(cond_dir)
                table.pop("class_tokens", None)
        if reg_data_dir:
            reg = parse_dreambooth_folders(reg_data_dir, is_reg=True)
            if not reg:
                logger.warning("--reg_data_dir %s has no '<repeats>_<class tokens>' "
                               "sub-folders; no regularisation images used", reg_data_dir)
            subsets += reg
    document = {"datasets": [{"subsets": subsets}]}
    return build_dataset_configs(document, file=None, cli_defaults=general,
                                 allowed_kinds=allowed_kinds, check_paths=check_paths)
