"""Glue the trainer scripts share between the parsed namespace and the library (the script boundary)."""

from __future__ import annotations

import logging
from typing import Any, Callable

from library.training.config import TrainConfig


def configure_logging(ns: Any) -> None:
    """Console logging from --console_log_level / --console_log_file."""
    level = getattr(logging, (getattr(ns, "console_log_level", None) or "INFO").upper())
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if getattr(ns, "console_log_file", None):
        handlers.append(logging.FileHandler(ns.console_log_file, encoding="utf-8"))
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", handlers=handlers, force=True)
    for noisy in ("transformers", "accelerate", "PIL"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    logging.getLogger("diffusers").setLevel(max(level, logging.ERROR))  # its dtype-cast notices are noise here


def build_data(ns: Any, cfg: TrainConfig, allowed_kinds=None, configs=None):
    """The dataset group from --dataset_config or the command-line dataset options.

    Every image is scanned here, so bad files are reported before any model loads. ``configs``:
    the ``(configs, source)`` of :func:`~library.config.dataset_cli.dataset_configs_from_values`
    when the script already read them.
    """
    from library.data.dataset import build_dataset_group

    values = dict(vars(ns))
    if allowed_kinds is not None:
        configs = None  # read them again with the kind check
    return build_dataset_group(values, allowed_kinds=allowed_kinds, configs=configs)


def make_sampler_callback(ns: Any, prompt_context: Callable | None = None) -> Callable | None:
    """The sample-image callback when --sample_prompts is given (None otherwise).

    ``prompt_context``: the method's per-prompt context (see ``sampling.sample_images``)."""
    if not getattr(ns, "sample_prompts", None):
        return None
    from library.training.sampling import SampleOptions, sample_images

    opts = SampleOptions(prompts_file=ns.sample_prompts, sampler=ns.sample_sampler, output_name=ns.output_name)

    def callback(run, epoch: int, step: int) -> None:
        sample_images(run, opts, epoch=epoch, step=step, prompt_context=prompt_context)
    return callback


def preflight_options(ns: Any):
    """The values :func:`library.training.preflight.run_preflight` checks, from the parsed options."""
    from library.training.preflight import PreflightOptions

    due = bool(getattr(ns, "sample_every_n_steps", None) or getattr(ns, "sample_every_n_epochs", None)
               or getattr(ns, "sample_at_first", False))
    return PreflightOptions(output_dir=ns.output_dir, logging_dir=getattr(ns, "logging_dir", None),
                            sample_prompts=getattr(ns, "sample_prompts", None),
                            sample_sampler=getattr(ns, "sample_sampler", None) or "ddim", sampling_due=due,
                            resume=getattr(ns, "resume", None))


def train_main(script: str, description: str, make_method: Callable[[Any, TrainConfig], Any], argv=None,
               allowed_kinds=None) -> None:
    """The whole of a trainer script: parse (with --config_file), check, scan data, build the method, train.

    ``script`` is the option set ("train", "train_network", ...); ``make_method(ns, cfg)`` turns the
    parsed options into the training method; ``allowed_kinds`` limits the dataset kinds
    ("dreambooth", "finetune", "controlnet").
    """
    from library.config.args import build_trainer_parser, parse_args_with_config
    from library.config.dataset_cli import dataset_configs_from_values
    from library.config.schema import validate_training_args
    from library.training.preflight import prepare_outputs, run_preflight

    # Everything up to here imports no torch/diffusers, so --help and option/config errors are quick.
    parser = build_trainer_parser(script, description=description)
    ns = parse_args_with_config(parser, argv)
    configure_logging(ns)
    validate_training_args(ns, script)
    run_preflight(preflight_options(ns))  # --resume, sample prompts, output folders: checked, nothing written
    cfg = TrainConfig.from_namespace(ns)
    configs = dataset_configs_from_values(dict(vars(ns)))
    from library.training.setup import run_training  # the heavy imports start here

    data = build_data(ns, cfg, allowed_kinds, configs=configs)  # scans every image before any model loads
    method = make_method(ns, cfg)
    if hasattr(method, "check_data"):  # checks that need the scanned dataset, still before any model loads
        method.check_data(data)
    lock = prepare_outputs(preflight_options(ns))  # every input checked: create, lock, clear leftovers
    try:
        path = run_training(cfg, data, method, make_sampler_callback(ns, getattr(method, "sample_context", None)))
    finally:
        if lock is not None:
            lock.release()
    if path is not None:
        print(f"saved {path}")
