"""What the one training loop does differently with several processes (``accelerate launch --multi_gpu``).

Every trainer gets this through :class:`library.training.trainer.Trainer`, whatever its method:

* **Data**: the prepared loader gives process ``p`` of ``N`` the bucket batches ``p, p + N, ...``
  of the epoch's (seeded) order, so one optimizer step consumes ``N x gradient_accumulation_steps``
  whole bucket batches: the global batch is ``N x batch x accumulation``.
* **Noise**: noise and timesteps of each batch come from a generator seeded by
  ``(seed, epoch, batch position in the epoch)`` (:func:`noise_seed`), so a batch gets the same noise
  whichever process trains it; ``N`` processes then compute what one process computes with
  ``--gradient_accumulation_steps N`` (the test suite checks this).
* **Gradients**: a method whose step calls the prepared modules themselves (full fine-tuning:
  ``forwards_through_prepared = True``) gets accelerate's DDP (or FSDP / DeepSpeed) wrappers.
  Adapters patched into a frozen model (LoRA, LLLite, textual inversion) are never called through
  a wrapper, and DDP only reduces gradients of modules whose own ``forward`` ran; for them (and for
  any method that does not say otherwise) :class:`GradientAverager` averages the gradients on every
  accumulation boundary, before clipping. With ``--fused_backward_pass`` each gradient is averaged
  inside its hook (:func:`average_grad`) before the parameter is stepped.
* **Checks**: ``SDXL_TRAINER_WEIGHT_HASH_DIR`` (a debugging aid) makes every process append the
  hash of its trained weights after each optimizer step to ``<dir>/rank<p>.txt``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
from collections.abc import Iterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from library.errors import UserError

logger = logging.getLogger(__name__)

WEIGHT_HASH_ENV = "SDXL_TRAINER_WEIGHT_HASH_DIR"
_BUCKET_BYTES = 256 * 2**20  # all-reduce gradients in flat buffers of at most this size


def noise_seed(seed: int, epoch: int, batch_index: int) -> int:
    """The seed of the noise and timesteps of batch ``batch_index`` (0-based, in the epoch's order)."""
    digest = hashlib.blake2b(f"noise:{seed}:{epoch}:{batch_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def batch_index(step_in_epoch: int, process_index: int, num_processes: int) -> int:
    """Position in the epoch's batch order of this process's ``step_in_epoch``-th batch."""
    return step_in_epoch * num_processes + process_index


def batches_per_process(num_batches: int, num_processes: int) -> int:
    """Batches each process sees per epoch (accelerate evens the shards by wrapping around)."""
    return math.ceil(num_batches / max(num_processes, 1))


def scheduler_steps_per_update(accelerator: Any) -> int:
    """How often one optimizer step advances the LR scheduler: ``num_processes`` times (accelerate's
    prepared scheduler, as in sd-scripts, whose schedule is therefore ``max_train_steps x num_processes``
    long), or once under DeepSpeed (its engine steps the scheduler itself, once per update)."""
    if "DEEPSPEED" in str(getattr(accelerator, "distributed_type", "NO")):
        return 1
    return accelerator.num_processes


def batch_metadata(batch_sizes: Sequence[int], num_batches: int, num_processes: int,
                   gradient_accumulation_steps: int) -> dict[str, str]:
    """``ss_batch_size_per_device``, ``ss_total_batch_size``, ``ss_num_batches_per_epoch`` as
    sd-scripts computes them (batch per device x processes x accumulation; batches of one process
    per epoch). With several datasets of different batch sizes the largest is used."""
    per_device = max(batch_sizes) if batch_sizes else 1
    return {"ss_batch_size_per_device": str(per_device),
            "ss_total_batch_size": str(per_device * num_processes * gradient_accumulation_steps),
            "ss_num_batches_per_epoch": str(batches_per_process(num_batches, num_processes))}


# --- gradients ------------------------------------------------------------------------------------


def _world() -> tuple[bool, int]:
    ok = torch.distributed.is_available() and torch.distributed.is_initialized()
    return ok, (torch.distributed.get_world_size() if ok else 1)


def average_grad(param: torch.Tensor) -> None:
    """Average ``param.grad`` over all processes in place (a hook for the fused backward pass)."""
    ok, world = _world()
    if ok and world > 1 and param.grad is not None:
        torch.distributed.all_reduce(param.grad, op=torch.distributed.ReduceOp.SUM)
        param.grad.div_(world)


def broadcast_from_main(params: Sequence[torch.Tensor]) -> None:
    """Give every process the main process's values of ``params`` (in place)."""
    ok, world = _world()
    if not ok or world == 1:
        return
    with torch.no_grad():
        for p in params:
            torch.distributed.broadcast(p.data, src=0)


class GradientAverager:
    """Average the gradients of ``params`` over all processes (DDP's result, for unwrapped modules).

    Which parameters have a gradient is agreed first (one small all-reduce), so a parameter that
    got a gradient on only some processes is averaged with zeros elsewhere and one that got none
    anywhere keeps ``grad = None`` (optimizers skip it, as in one process).
    """

    def __init__(self, params: Sequence[torch.Tensor]):
        seen: set[int] = set()
        self.params = [p for p in params if p.requires_grad and not (id(p) in seen or seen.add(id(p)))]

    def __call__(self) -> None:
        ok, world = _world()
        if not ok or world == 1 or not self.params:
            return
        device = self.params[0].device
        has = torch.tensor([p.grad is not None for p in self.params], dtype=torch.int32, device=device)
        torch.distributed.all_reduce(has, op=torch.distributed.ReduceOp.MAX)
        todo = []
        for p, flag in zip(self.params, has.tolist()):
            if not flag:
                continue
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            todo.append(p.grad)
        for bucket in _buckets(todo):
            flat = torch._utils._flatten_dense_tensors(bucket)
            torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
            flat.div_(world)
            for grad, synced in zip(bucket, torch._utils._unflatten_dense_tensors(flat, bucket)):
                grad.copy_(synced)


def _buckets(grads: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Group gradients of one device and dtype into buckets of at most ``_BUCKET_BYTES``."""
    by_kind: dict[tuple, list[list[torch.Tensor]]] = {}
    for g in grads:
        lists = by_kind.setdefault((g.device, g.dtype), [[]])
        if lists[-1] and sum(t.numel() * t.element_size() for t in lists[-1]) + g.numel() * g.element_size() \
                > _BUCKET_BYTES:
            lists.append([])
        lists[-1].append(g)
    return [b for lists in by_kind.values() for b in lists if b]


def uses_wrappers(accelerator: Any, method: Any, fused: bool) -> bool:
    """Whether the trained modules go through ``accelerator.prepare`` (DDP/FSDP/DeepSpeed wrappers).

    Sharded training (FSDP, DeepSpeed) always wraps. Plain multi-process training wraps only methods
    that call the prepared modules (``method.forwards_through_prepared``) and do not step inside
    backward; everything else is averaged by :class:`GradientAverager`. One process: no wrapper is
    needed, but preparing is harmless and keeps accelerate's mixed-precision forward wrapper.
    """
    kind = str(getattr(accelerator, "distributed_type", "NO"))
    if "DEEPSPEED" in kind or "FSDP" in kind:
        return True
    if accelerator.num_processes == 1:
        return True
    return bool(getattr(method, "forwards_through_prepared", False)) and not fused


def is_sharded(accelerator: Any) -> bool:
    """FSDP or DeepSpeed: the trained weights may live in pieces across processes."""
    kind = str(getattr(accelerator, "distributed_type", "NO"))
    return "DEEPSPEED" in kind or "FSDP" in kind


class TrainedModules(torch.nn.Module):
    """The trained modules as one module: DeepSpeed (and accelerate's FSDP2) take one model.

    The step keeps calling the inner modules directly; ZeRO's gradient and parameter hooks sit on
    the parameters and submodules, so they fire all the same.
    """

    def __init__(self, modules: Sequence[torch.nn.Module]):
        super().__init__()
        self.inner = torch.nn.ModuleList(modules)

    def forward(self, *args, **kwargs):  # never called: the step uses the inner modules
        raise RuntimeError("TrainedModules only groups modules for DeepSpeed; call the inner modules")


def fsdp_group(accelerator: Any, modules: Sequence[torch.nn.Module]) -> TrainedModules:
    """The trained modules as one model for FSDP, each of them an FSDP unit of its own.

    accelerate's FSDP2 takes one model per ``prepare``, and the step calls the U-Net and the text
    encoders directly, never the group: a module's weights are gathered by its own unit's forward
    hook, so every trained module must be a unit (weights left to the group's root unit would stay
    sharded). The layer classes of ``--fsdp_transformer_layer_cls_to_wrap`` are kept where they occur
    in the trained modules (a text-encoder layer class is simply unused when only the U-Net trains).
    """
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    plugin = accelerator.state.fsdp_plugin
    if plugin.fsdp_version != 2:
        raise UserError("FSDP: use FSDP2 (accelerate launch --use_fsdp --fsdp_version 2); FSDP1 is not supported")
    policy = getattr(plugin.auto_wrap_policy, "func", plugin.auto_wrap_policy)
    if policy not in (None, transformer_auto_wrap_policy):
        raise UserError("FSDP: --fsdp_auto_wrap_policy must be TRANSFORMER_BASED_WRAP (or NO_WRAP): the U-Net and "
                        "text encoders are wrapped by layer class")
    present = {type(m).__name__ for module in modules for m in module.modules()}
    listed = plugin.transformer_cls_names_to_wrap
    if listed is None:  # accelerate's default: the models' own _no_split_modules
        listed = [n for module in modules for n in (getattr(module, "_no_split_modules", None) or [])]
    names = [n for n in dict.fromkeys(listed) if n in present]
    names += [type(m).__name__ for m in modules if type(m).__name__ not in names]
    plugin.auto_wrap_policy, plugin.transformer_cls_names_to_wrap = transformer_auto_wrap_policy, names
    return TrainedModules(modules)


def _keep_output_capture(modules: Sequence[torch.nn.Module]) -> None:
    """FSDP2 swaps each sharded module's class for a subclass; transformers looks up what a model may
    record (``output_hidden_states``) by the class's name, so a sharded CLIP text encoder would return
    no hidden states. Register the swapped classes under the same entries."""
    try:
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY
    except ImportError:  # another transformers: nothing to do
        return
    for module in modules:
        for sub in module.modules():
            if getattr(sub, "_can_record_outputs", None) is not None and not _CAN_RECORD_REGISTRY.get(sub):
                _CAN_RECORD_REGISTRY[sub] = sub._can_record_outputs


def prepare(accelerator: Any, method: Any, modules: list[torch.nn.Module], optimizer, loader, scheduler,
            fused: bool) -> tuple:
    """``accelerator.prepare`` the run's pieces for this launch.

    Returns ``(trained modules as the step must call them, optimizer, loader, scheduler, gradient
    averager or None, wrapped)``; ``wrapped`` is what :func:`gather_trained` gathers from (the
    DeepSpeed engine, or the list of prepared modules).
    """
    kind = str(getattr(accelerator, "distributed_type", "NO"))
    if accelerator.is_main_process:
        how = ("DeepSpeed ZeRO" if "DEEPSPEED" in kind else "FSDP" if "FSDP" in kind
               else "DDP" if uses_wrappers(accelerator, method, fused) else "gradients averaged by the loop")
        logger.info("training on %d process(es), %s (%s)", accelerator.num_processes, kind.split(".")[-1],
                    how if accelerator.num_processes > 1 else "no gradient sync needed")
    if "DEEPSPEED" in kind or "FSDP" in kind:
        group = TrainedModules(modules) if "DEEPSPEED" in kind else fsdp_group(accelerator, modules)
        engine, optimizer, loader, scheduler = accelerator.prepare(group, optimizer, loader, scheduler)
        inner = list(accelerator.unwrap_model(engine).inner)
        if "FSDP" in kind:
            _keep_output_capture(inner)
            for module in inner:  # the step reads some weights after the forward (TE2's text_projection)
                module.set_reshard_after_forward(False, recurse=False)
        return inner, optimizer, loader, scheduler, None, engine
    if uses_wrappers(accelerator, method, fused):
        prepared = accelerator.prepare(*modules, optimizer, loader, scheduler)
        n = len(modules)
        trained = list(prepared[:n])
        return (trained, *prepared[n:], None, trained)
    optimizer, loader, scheduler = accelerator.prepare(optimizer, loader, scheduler)
    for module in modules:  # not prepared, so save_state/load_state would skip their weights
        accelerator.register_for_checkpointing(module)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    broadcast_from_main(params)  # as DDP does: without --seed the processes initialised adapters differently
    return modules, optimizer, loader, scheduler, (None if fused else GradientAverager(params)), modules


def gather_trained(accelerator: Any, wrapped: Any, trained: list[torch.nn.Module]) -> list[dict]:
    """Full state dicts (on the CPU) of the trained modules, on the main process, under FSDP/DeepSpeed.

    A collective: every process must call it (others get partial or empty dicts). For DeepSpeed the
    engine's state dict (ZeRO-3 needs ``--zero3_save_16bit_model`` to gather) is split per module.
    """
    if isinstance(wrapped, list):
        return [_cpu(accelerator.get_state_dict(m, unwrap=True)) for m in wrapped]
    full = accelerator.get_state_dict(wrapped, unwrap=True)
    out: list[dict] = [{} for _ in trained]
    for key, value in (full or {}).items():
        head, _, rest = key.partition(".")  # "inner.<i>.<name>"
        index, _, name = rest.partition(".")
        if head == "inner" and index.isdigit():
            out[int(index)][name] = value.detach().cpu()
    return out


def _cpu(state: dict | None) -> dict:
    return {k: v.detach().cpu() for k, v in (state or {}).items()}


def materialize(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A plain CPU module of ``module``'s class and config holding the full weights ``state``
    (for saving a module whose own parameters are FSDP/ZeRO-3 shards)."""
    # FSDP2 swaps a module's class for a subclass of torch.distributed's; rebuild the model's own class
    cls = next(c for c in type(module).__mro__ if not c.__module__.startswith("torch.distributed"))
    config = getattr(module, "config", None)
    if config is None:
        raise RuntimeError(f"cannot rebuild {cls.__name__} for saving: it has no config")
    fresh = cls.from_config(config) if hasattr(cls, "from_config") else cls(config)
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if not k.endswith("position_ids")]:
        raise RuntimeError(f"gathered weights do not fit {cls.__name__}: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")
    return fresh


# --- checks, debugging ----------------------------------------------------------------------------


class WeightHashLog:
    """With ``SDXL_TRAINER_WEIGHT_HASH_DIR`` set, append ``"<step> <sha256 of the trained weights>"``
    to ``<dir>/rank<process>.txt`` after every optimizer step (off, and free, otherwise)."""

    def __init__(self, process_index: int):
        folder = os.environ.get(WEIGHT_HASH_ENV)
        self.path = Path(folder) / f"rank{process_index}.txt" if folder else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, step: int, params: Sequence[torch.Tensor]) -> None:
        if self.path is None:
            return
        digest = hashlib.sha256()
        for p in params:
            digest.update(p.detach().float().cpu().contiguous().numpy().tobytes())
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(f"{step} {digest.hexdigest()}\n")


def fsdp_requested() -> bool:
    """Whether ``accelerate launch --use_fsdp`` (or an accelerate config with FSDP) started this process."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


@contextlib.contextmanager
def plain_model_construction(accelerator: Any) -> Iterator[None]:
    """Models built inside are plain modules, also under DeepSpeed ZeRO-3.

    accelerate registers its DeepSpeed config with transformers, which then builds every text encoder
    inside ``deepspeed.zero.Init`` (partitioned as it is constructed) under ZeRO-3; our loader builds
    on the meta device and assigns the file's weights, which a partitioned module cannot take. The
    models are loaded whole and the engine partitions them at ``prepare``.
    """
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


def check_launch(accelerator: Any) -> None:
    """UserError when FSDP was asked for but accelerate set up something else (it would train unsharded)."""
    kind = str(getattr(accelerator, "distributed_type", "NO")).split(".")[-1]
    if fsdp_requested() and kind not in ("FSDP", "DEEPSPEED"):
        raise UserError(f"accelerate launch --use_fsdp: accelerate set up {kind}, not FSDP (accelerate {_version()} "
                        "applies its FSDP plugin only to GPU processes); on the CPU train with accelerate launch "
                        "--multi_gpu instead")


def _version() -> str:
    import accelerate

    return accelerate.__version__


def check_options(deepspeed: bool, fused_backward_pass: bool, method_kind: str, ema: bool = False,
                  zero_stage: int = 2, trains_text_encoders: bool = False) -> None:
    """UserError for distributed options that cannot work, before any model is loaded."""
    sharding = "--deepspeed" if deepspeed else "FSDP (accelerate launch --use_fsdp)" if fsdp_requested() else None
    if sharding is None:
        return
    if deepspeed:
        try:
            import deepspeed as _  # noqa: F401
        except ImportError:
            raise UserError("--deepspeed needs the DeepSpeed package: pip install -e .[deepspeed] "
                            "(or pip install deepspeed)") from None
        if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise UserError("--deepspeed with several processes needs CUDA GPUs (accelerate 1.15 forms no DeepSpeed "
                            "process group on the CPU); on the CPU launch with accelerate launch --multi_gpu and "
                            "without --deepspeed")
    if method_kind != "checkpoint":
        raise UserError(f"{sharding} shards full fine-tuning (sdxl_train.py); adapters are small enough for "
                        "plain multi-GPU training: accelerate launch --multi_gpu, without it")
    if fused_backward_pass:
        raise UserError(f"--fused_backward_pass cannot be combined with {sharding} (it steps the optimizer itself)")
    if ema:
        raise UserError(f"--ema cannot be combined with {sharding} (the EMA copy would need the full weights "
                        "on every GPU); train without --ema or on plain multi-GPU")
    if deepspeed and zero_stage == 3 and trains_text_encoders:
        # transformers' CLIP reads position_embedding.weight.shape outside that module's forward, where
        # ZeRO-3 has not gathered the shard (it reads as 0 and the text encoder stops)
        raise UserError("--deepspeed --zero_stage 3 cannot train the text encoders (CLIP reads a sharded weight's "
                        "shape outside its forward); use --zero_stage 2 or FSDP2 with --train_text_encoder, or "
                        "train the U-Net only")


def accelerator_kwargs(cfg: Any) -> dict[str, Any]:
    """Extra ``Accelerator`` arguments: DDP knobs (``--ddp_*``) and the DeepSpeed plugin (``--deepspeed``)."""
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    handlers: list = []
    if cfg.ddp_timeout:
        handlers.append(InitProcessGroupKwargs(timeout=timedelta(minutes=cfg.ddp_timeout)))
    if cfg.ddp_gradient_as_bucket_view or cfg.ddp_static_graph:
        handlers.append(DistributedDataParallelKwargs(gradient_as_bucket_view=cfg.ddp_gradient_as_bucket_view,
                                                      static_graph=cfg.ddp_static_graph))
    out: dict[str, Any] = {"kwargs_handlers": handlers} if handlers else {}
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available() and not cfg.deepspeed:
        out["cpu"] = True  # accelerate forms a CPU (gloo) process group only when told cpu=True
    if cfg.deepspeed:
        out["deepspeed_plugin"] = deepspeed_plugin(cfg)
    return out


def deepspeed_plugin(cfg: Any):
    """accelerate's DeepSpeed plugin from sd-scripts' option names."""
    from accelerate.utils import DeepSpeedPlugin

    plugin = DeepSpeedPlugin(
        zero_stage=cfg.zero_stage, gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        gradient_clipping=float(cfg.max_grad_norm or 0.0),  # 0: no clipping
        offload_optimizer_device=cfg.offload_optimizer_device or "none",
        offload_optimizer_nvme_path=cfg.offload_optimizer_nvme_path,
        offload_param_device=cfg.offload_param_device or "none",
        offload_param_nvme_path=cfg.offload_param_nvme_path,
        zero3_init_flag=cfg.zero3_init_flag, zero3_save_16bit_model=cfg.zero3_save_16bit_model)
    if not cfg.max_grad_norm:  # accelerate >= 1.16 writes 0.0; say "no clipping" the same way on every version
        plugin.deepspeed_config.pop("gradient_clipping", None)
    if cfg.mixed_precision == "fp16" and cfg.fp16_master_weights_and_gradients:
        # sd-scripts' option; DeepSpeed supports it with ZeRO-Offload (CPU Adam) at stage 2 only
        plugin.deepspeed_config["fp16"] = {"enabled": True, "fp16_master_weights_and_grads": True}
    return plugin
