"""The dataset described by command-line options alone (no ``--dataset_config``).

``--train_data_dir`` holds DreamBooth folders named ``<repeats>_<class tokens>`` (``10_sks dog``),
``--reg_data_dir`` the same for regularisation images, ``--in_json`` a fine-tuning metadata file.
With ``--conditioning_data_dir`` (ControlNet-LLLite control images, ``--masked_loss`` masks), a
``--train_data_dir`` that holds images itself is the one subset (sd-scripts' ControlNet layout);
one that holds only ``<repeats>_<name>`` folders gives a subset per folder (our extension).
:func:`dataset_configs_from_values` reads either these options or ``--dataset_config`` and checks
the configs against the caching options; nothing here imports torch, so a bad dataset config is
reported before the models' libraries are loaded.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

from library.config.dataset_toml import DatasetConfig, build_dataset_configs, load_dataset_config
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


def _holds_images(folder: Path) -> bool:
    from library.data.images import is_image_path

    return any(not p.name.startswith(".") and p.is_file() and is_image_path(p.name) for p in folder.iterdir())


def controlnet_subsets(train_data_dir: str | Path, conditioning_data_dir: str) -> list[dict[str, Any]]:
    """Subset tables for ``--train_data_dir`` with ``--conditioning_data_dir`` (no dataset config).

    As in sd-scripts, a ``train_data_dir`` that holds images itself is the one subset, with
    ``num_repeats = 1``. Our extension: one that holds no images but ``<repeats>_<name>``
    folders gives one subset per folder, each paired with ``conditioning_data_dir`` and with the
    folder's name as the class tokens (the caption of images without a caption file).
    """
    parent = Path(train_data_dir)
    if not parent.is_dir():
        raise UserError(f"--train_data_dir: folder '{parent}' does not exist")
    if _holds_images(parent):
        return [{"image_dir": str(parent), "num_repeats": 1, "conditioning_data_dir": conditioning_data_dir}]
    subsets = parse_dreambooth_folders(parent)
    if not subsets:
        raise UserError(f"--train_data_dir {parent} has no images (and no '<repeats>_<name>' "
                        "sub-folders); with --conditioning_data_dir put the training images in it, "
                        "with the same file names as the images in --conditioning_data_dir")
    for table in subsets:
        table["conditioning_data_dir"] = conditioning_data_dir
    return subsets


def dataset_config_from_cli(train_data_dir: Optional[str], reg_data_dir: Optional[str],
                            in_json: Optional[str], general: Mapping[str, Any], *,
                            allowed_kinds: Optional[Iterable[str]] = None,
                            check_paths: bool = True) -> list[DatasetConfig]:
    """The dataset when no ``--dataset_config`` is given.

    With ``in_json``: one fine-tuning subset (metadata_file = in_json, image_dir =
    train_data_dir, num_repeats = dataset_repeats). With ``general["conditioning_data_dir"]``:
    ControlNet subsets (see :func:`controlnet_subsets`). Otherwise DreamBooth subsets from the
    folders of train_data_dir and (is_reg) reg_data_dir. ``general`` holds the other
    command-line values (argparse names).
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
        cond_dir = general.pop("conditioning_data_dir", None)
        if cond_dir:
            subsets = controlnet_subsets(train_data_dir, str(cond_dir))
        else:
            subsets = parse_dreambooth_folders(train_data_dir)
            if not subsets:
                raise UserError(f"--train_data_dir {train_data_dir} has no '<repeats>_<class "
                                "tokens>' sub-folders; put the images in e.g. "
                                f"'{Path(train_data_dir) / '10_sks dog'}'")
        if reg_data_dir:
            reg = parse_dreambooth_folders(reg_data_dir, is_reg=True)
            if not reg:
                logger.warning("--reg_data_dir %s has no '<repeats>_<class tokens>' "
                               "sub-folders; no regularisation images used", reg_data_dir)
            subsets += reg
    document = {"datasets": [{"subsets": subsets}]}
    return build_dataset_configs(document, file=None, cli_defaults=general,
                                 allowed_kinds=allowed_kinds, check_paths=check_paths)


def _subset_where(source: str, d: int, s: int, subset: Any) -> str:
    name = subset.image_dir or subset.metadata_file
    return f"{source}, dataset {d + 1} subset {s + 1} ({name})"


def verify_text_encoder_cache_compat(configs: Sequence[DatasetConfig], source: str) -> None:
    """Raise :class:`UserError` when any subset changes captions between steps (shuffle, dropout,
    tag dropout, token warm-up), which cached text-encoder outputs cannot follow."""
    from library.config.schema import check_te_cache_compat

    for d, ds in enumerate(configs):
        for s, sub in enumerate(ds.subsets):
            check_te_cache_compat(sub.shuffle_caption, sub.caption_dropout_rate,
                                  sub.caption_tag_dropout_rate, sub.token_warmup_step,
                                  _subset_where(source, d, s, sub),
                                  dropout_every_n_epochs=sub.caption_dropout_every_n_epochs)
            if sub.enable_wildcard:
                logger.warning("%s: enable_wildcard with cached text-encoder outputs: one fixed "
                               "choice per caption is cached", _subset_where(source, d, s, sub))


def verify_latent_cache_compat(configs: Sequence[DatasetConfig], source: str) -> None:
    """Raise :class:`UserError` when any subset uses ``color_aug`` or ``random_crop``, which
    cached latents cannot follow (``flip_aug`` is fine: flipped latents are cached too)."""
    from library.config.schema import check_latent_cache_compat

    for d, ds in enumerate(configs):
        for s, sub in enumerate(ds.subsets):
            check_latent_cache_compat(sub.color_aug, sub.random_crop,
                                      _subset_where(source, d, s, sub))


def dataset_configs_from_values(values: Mapping[str, Any], *,
                                allowed_kinds: Optional[Sequence[str]] = None
                                ) -> tuple[list[DatasetConfig], str]:
    """The dataset configs a script's options describe, and a phrase naming where they came from.

    ``--dataset_config`` if given, else ``--train_data_dir``/``--reg_data_dir``/``--in_json``.
    Cache compatibility (``cache_text_encoder_outputs``/``cache_latents`` with caption or image
    augmentation) is checked here, before any image is read. Raises UserError.
    """
    if values.get("dataset_config"):
        source = f"dataset config {values['dataset_config']}"
        configs = load_dataset_config(values["dataset_config"], cli_defaults=values,
                                      allowed_kinds=allowed_kinds)
    else:
        source = "the command-line dataset options"
        configs = dataset_config_from_cli(values.get("train_data_dir"), values.get("reg_data_dir"),
                                          values.get("in_json"), values, allowed_kinds=allowed_kinds)
    if values.get("cache_text_encoder_outputs") or values.get("cache_text_encoder_outputs_to_disk"):
        verify_text_encoder_cache_compat(configs, source)
    if values.get("cache_latents") or values.get("cache_latents_to_disk"):
        verify_latent_cache_compat(configs, source)
    if values.get("face_crop_aug_range") or any(s.face_crop_aug_range for c in configs for s in c.subsets):
        logger.warning("face_crop_aug_range is not supported yet and is ignored")
    return configs, source
