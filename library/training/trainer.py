"""The one training loop every trainer runs; a *method* says what is trained and what is saved.

The step is written for the GPU: no host synchronisation inside it (losses are summed on the device
and read every ``log_every_n_steps``), noise and timesteps come from one seeded generator whose
state is saved with ``--save_state``, and data arrive as whole bucket batches from a worker pool.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from accelerate import Accelerator
from accelerate.utils import AutocastKwargs
from tqdm.auto import tqdm

from library.data.dataset import make_dataloader
from library.diffusion import losses, noise
from library.diffusion.conditioning import TextConditioner, time_ids, unet_added_cond
from library.errors import UserError
from library.models.fp8 import needs_autocast
from library.models.sdxl import VAE_SCALE_FACTOR, SDXLModels
from library.training import checkpointing as ckpt
from library.training import save_guard, state_io
from library.training import distributed
from library.training.config import TrainConfig
from library.training.adafactor import Adafactor
from library.training.fused_backward import check_fused_backward, fused_backward_step
from library.training.optim import (build_lr_scheduler, build_optimizer, inner_optimizer, parse_optimizer_args,
                                    parse_scheduler_args)
from library.training.precision import allow_fp16_gradients, check_mixed_precision_device
from library.training.start_position import apply_initial_step
from library.training.validation import Validator

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class Method(Protocol):
    """What a trainer trains and saves; the loop is the same for all of them."""

    kind: str  # modelspec kind: "lora", "checkpoint", "textual-inversion", "control-net-lllite"
    trains_text_encoders: bool  # gradients must flow through the text encoders
    unet_weights_trained: bool  # the U-Net's own weights change (fp32 master weights unless full_bf16/fp16)
    text_encoder_weights_trained: bool

    def setup(self, run: "TrainingRun") -> None: ...
    def param_groups(self) -> list[dict]: ...
    def trained_modules(self) -> list[torch.nn.Module]: ...
    def set_prepared(self, modules: list[torch.nn.Module]) -> None: ...
    def unet_forward(self, run: "TrainingRun", noisy: torch.Tensor, timesteps: torch.Tensor,
                     context: torch.Tensor, added: dict, batch: dict) -> torch.Tensor: ...
    def save(self, run: "TrainingRun", stem: str, epoch: int, step: int) -> Path: ...
    def after_optimizer_step(self, run: "TrainingRun") -> None: ...


@dataclass
class TrainingRun:
    """Everything a method may need while it sets up, steps and saves."""

    cfg: TrainConfig
    models: SDXLModels
    conditioner: TextConditioner
    data: Any  # library.data.dataset.DatasetGroup
    accelerator: Accelerator
    weight_dtype: torch.dtype
    scheduler: Any = None  # the DDPM noise scheduler
    progress: ckpt.TrainProgress | None = None
    optimizer_description: str = ""
    started_at: float = 0.0
    encode_text: Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]] | None = None  # captions -> (context, pooled)
    originals: dict[str, torch.nn.Module] = field(default_factory=dict)  # untouched frozen modules, for saving
    prompt_replacements: dict[str, str] = field(default_factory=dict)  # sample prompts: word -> text (TI tokens)
    gathered: list[dict] | None = None  # FSDP/ZeRO-3: full state dicts of the trained modules, while saving

    @property
    def device(self) -> torch.device:
        return self.accelerator.device


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    """The accelerate object for a run (mixed precision, accumulation, trackers)."""
    log_with = None
    if cfg.log_with:
        log_with = ["tensorboard", "wandb"] if cfg.log_with == "all" else [cfg.log_with]
    if log_with and not cfg.logging_dir and "tensorboard" in log_with:
        raise UserError("--log_with tensorboard needs --logging_dir")
    acc = Accelerator(gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                      mixed_precision=cfg.mixed_precision if cfg.mixed_precision != "no" else "no",
                      log_with=log_with, project_dir=cfg.logging_dir, **distributed.accelerator_kwargs(cfg))
    check_mixed_precision_device(cfg.mixed_precision, acc.device.type)  # before any model loads
    distributed.check_launch(acc)
    return acc


class Trainer:
    """Runs :class:`Method` ``method`` over the data of ``run`` for the configured steps or epochs."""

    def __init__(self, run: TrainingRun, method: Method, sampler: Callable[..., None] | None = None):
        self.run = run
        self.cfg = run.cfg
        self.method = method
        self.sampler = sampler  # called as sampler(run, epoch=..., step=...) when sampling is due
        self.out = Path(self.cfg.output_dir)
        self._unet_mixed: bool | None = None
        self._text_in_graph = False  # the method's text encoding runs inside the CUDA graph (TI)
        self._step_in_graph: bool | None = None  # the optimizer step replays with the backward (first batch decides)
        self.last_good_save: Path | None = None  # newest model file written with sound weights

    # -----------------------------------------------------------------------------------------
    def setup(self) -> None:
        """Method setup, optimizer, LR scheduler, data loader, accelerate preparation and --resume."""
        run, cfg, acc = self.run, self.cfg, self.run.accelerator
        run.scheduler = noise.make_noise_scheduler(cfg.v_parameterization, cfg.zero_terminal_snr)
        self.method.setup(run)
        if cfg.gradient_checkpointing and cfg.cpu_offload_checkpointing:
            from library.training.offload_checkpointing import enable_cpu_offload_checkpointing
            enable_cpu_offload_checkpointing(run.models.unet)
        groups = self.method.param_groups()
        if not any(p.requires_grad for g in groups for p in g["params"]):
            raise UserError("nothing to train: every learning rate is 0 or every module is frozen")
        self.optimizer, run.optimizer_description = build_optimizer(
            cfg.optimizer_type, groups, cfg.learning_rate, parse_optimizer_args(list(cfg.optimizer_args)))
        self.loader = make_dataloader(run.data, cfg.max_data_loader_n_workers, cfg.persistent_data_loader_workers,
                                      pin_memory=acc.device.type == "cuda")
        updates_per_epoch = math.ceil(len(self.loader) / acc.num_processes / cfg.gradient_accumulation_steps)
        self.max_steps = cfg.max_train_steps
        if cfg.max_train_epochs:
            self.max_steps = cfg.max_train_epochs * updates_per_epoch
        self.lr_scheduler = build_lr_scheduler(
            cfg.lr_scheduler, self.optimizer, self.max_steps * distributed.scheduler_steps_per_update(acc),
            cfg.lr_warmup_steps,
            cfg.lr_scheduler_num_cycles, cfg.lr_scheduler_power, parse_scheduler_args(list(cfg.lr_scheduler_args)),
            cfg.lr_scheduler_type, num_decay_steps=cfg.lr_decay_steps, timescale=cfg.lr_scheduler_timescale,
            min_lr_ratio=cfg.lr_scheduler_min_lr_ratio)
        modules = self.method.trained_modules()
        # DDP/FSDP/DeepSpeed wrappers, or unwrapped modules whose gradients the loop averages (see distributed)
        self.trained, self.optimizer, self.loader, self.lr_scheduler, self.average_gradients, self.wrapped = \
            distributed.prepare(acc, self.method, modules, self.optimizer, self.loader, self.lr_scheduler,
                                fused=cfg.fused_backward_pass)
        self.method.set_prepared(list(self.trained))
        self.trained_params = [q for g in self.optimizer.param_groups for q in g["params"]]
        if cfg.full_fp16:
            allow_fp16_gradients(acc)  # fp16 weights: the GradScaler must unscale fp16 gradients
        self.fused = None
        if cfg.fused_backward_pass:
            check_fused_backward(cfg.optimizer_type, cfg.gradient_accumulation_steps, cfg.mixed_precision)
            self.fused = fused_backward_step(self.optimizer.optimizer if hasattr(self.optimizer, "optimizer")
                                             else self.optimizer, cfg.max_grad_norm or None,
                                             grad_reduce=distributed.average_grad if acc.num_processes > 1 else None)
        elif cfg.fused_optimizer_groups:
            from library.training.fused_groups import fused_optimizer_groups
            check_fused_backward(cfg.optimizer_type, cfg.gradient_accumulation_steps, cfg.mixed_precision,
                                 option="--fused_optimizer_groups")
            if acc.num_processes > 1:
                raise UserError("--fused_optimizer_groups steps before gradients are averaged across GPUs; "
                                "use --fused_backward_pass on several GPUs")
            self.fused = fused_optimizer_groups(self.optimizer, cfg.fused_optimizer_groups, cfg.max_grad_norm or None)
        self.weight_hashes = distributed.WeightHashLog(acc.process_index)
        run.progress = ckpt.TrainProgress()
        self.rng = ckpt.NoiseRNG(cfg.seed if cfg.seed is not None else 0, acc.device)
        self.num_epochs = math.ceil(self.max_steps / max(updates_per_epoch, 1))
        if cfg.save_n_epoch_ratio:  # sd-scripts: at least N saves over the run
            self.cfg = run.cfg = ckpt.with_save_n_epoch_ratio(cfg, self.num_epochs)
        if cfg.resume:
            self._resume(cfg.resume)
        apply_initial_step(run.progress, self.lr_scheduler, initial_step=cfg.initial_step,
                           initial_epoch=cfg.initial_epoch, skip_batches=cfg.skip_until_initial_step,
                           steps_per_epoch=updates_per_epoch, max_steps=self.max_steps,
                           gradient_accumulation_steps=cfg.gradient_accumulation_steps, num_processes=acc.num_processes)
        self.validation = Validator.for_trainer(self)
        self.graphed = self._graphed_loss()
        if acc.is_main_process and cfg.log_with:
            acc.init_trackers(cfg.log_tracker_name or "network_train", config={"max_train_steps": self.max_steps})

    def _resume(self, path: str) -> None:
        state_dir = Path(path)
        self.run.progress = state_io.load_state(self.run.accelerator, state_dir)  # never unpickles code
        self.rng.restore(self.run.progress.rng_state)
        p = self.run.progress
        logger.info("resumed from %s at epoch %d, step %d", state_dir, p.epoch + 1, p.global_step)

    def _graphed_loss(self):
        """The CUDA-graphed loss and backward (see library.training.cuda_graphs), or None for eager steps."""
        from library.training.cuda_graphs import GraphedLoss, graph_blocker, without_rng_stash

        acc = self.run.accelerator
        why = graph_blocker(self.cfg, acc, self.method, self.fused)
        if why is not None:
            if acc.device.type == "cuda":
                logger.info("CUDA graphs off: %s", why)
            return None
        without_rng_stash(self.run.models.unet)
        if self.fused is not None:  # the optimizer steps inside the graph: its lr and step come from the device
            self.fused.use_device_scalars(acc.device)
        self._text_in_graph = bool(getattr(self.method, "graph_text_encoding", False))
        logger.info("CUDA graphs on: each batch shape runs eagerly once, then replays as a graph%s",
                    " (text encoders included)" if self._text_in_graph else "")
        return GraphedLoss(self.denoise_loss, acc.backward, self.trained_params, grad_buffers=self.fused is None,
                           probe=self.fused.probe if self.fused is not None else None,
                           optimizer_state=(lambda: self.fused.optimizer.state) if self.fused is not None else None)

    def _optimizer_joins_graph(self, inputs: dict[str, torch.Tensor]) -> bool:
        """At the first batch: move the optimizer step into the CUDA graphs when it can replay there.

        With the batched Adafactor, no fused pass, one process and no gradient accumulation, and when
        nothing continues eagerly after a replay (the U-Net's inputs need no gradient: no text encoder or
        embedding is trained), clipping, the optimizer step and the clearing of the gradients are captured
        with the backward. The gradients then live only inside a replay, as in an eager step, instead of
        in buffers held through the forward (0.44 GiB for the full fine-tune at 1024²), and the step costs
        no host time. The step's numbers come from device tensors (``Adafactor.fill_device_factors``).
        """
        cfg, adafactor = self.cfg, inner_optimizer(self.optimizer)
        if (self.fused is not None or type(adafactor) is not Adafactor or cfg.gradient_accumulation_steps != 1
                or self.average_gradients is not None or any(t.requires_grad for t in inputs.values())):
            return False
        adafactor.use_device_factors(self.run.accelerator.device)
        self.graphed.step_inside(self._backward_and_step, adafactor.state_probe, lambda: adafactor.state)
        logger.info("CUDA graphs: the optimizer step replays inside the graph")
        return True

    def _backward_and_step(self, loss: torch.Tensor) -> None:
        """Backward, clipping, the optimizer step and clearing the gradients: one replayable unit."""
        acc, cfg = self.run.accelerator, self.cfg
        acc.backward(loss)
        if cfg.max_grad_norm:
            acc.clip_grad_norm_(self.trained_params, cfg.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    # -----------------------------------------------------------------------------------------
    def _unet_is_mixed(self) -> bool:
        if self._unet_mixed is None:
            unet = self.run.accelerator.unwrap_model(self.run.models.unet)
            self._unet_mixed = needs_autocast(unet, self.run.weight_dtype)  # fp8 layers upcast themselves
        return self._unet_mixed

    def unet_autocast(self):
        """Autocast only where the U-Net holds weights in another dtype than the compute dtype.

        A frozen U-Net stored in bf16/fp16 (LoRA, full_bf16) needs no autocast: skipping it saves the
        fp32 copies autocast makes around normalisation layers (~1.5 GB at 1024^2) and the cast kernels.
        Nor does one stored in fp8 (``--fp8_base``): its layers upcast their own weights.
        """
        if self._unet_is_mixed():
            return self.run.accelerator.autocast()
        return contextlib.nullcontext()

    def latents_of(self, batch: dict, generator: torch.Generator | None = None) -> torch.Tensor:
        """Scaled latents: from the cache, or encoded now with the frozen VAE (sampled with ``generator``)."""
        if "latents" in batch:
            latents = batch["latents"]
        else:
            vae = self.run.models.vae
            with torch.no_grad():
                posterior = vae.encode(batch["images"].to(vae.device, vae.dtype)).latent_dist
                latents = posterior.sample(generator=generator if generator is not None else self.rng.generator).float()
            latents = torch.nan_to_num(latents)
        return latents.to(self.run.device, self.run.weight_dtype) * VAE_SCALE_FACTOR

    def text_of(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(context, pooled): from the cache, or encoded now (with gradients when a TE is trained)."""
        if "te_outputs" in batch:
            h1, h2, pooled = batch["te_outputs"]
            return torch.cat([h1, h2], dim=-1).to(self.run.weight_dtype), pooled.to(self.run.weight_dtype)
        grad = torch.enable_grad() if self.method.trains_text_encoders and torch.is_grad_enabled() else torch.no_grad()
        with grad, self.run.accelerator.autocast():
            context, pooled = self.run.encode_text(batch["captions"])
        return context.to(self.run.weight_dtype), pooled.to(self.run.weight_dtype)

    def loss_of(self, batch: dict, generator: torch.Generator | None = None, timesteps: int | None = None) -> torch.Tensor:
        """The weighted denoising loss of one batch (a 0-dim device tensor).

        Noise comes from ``generator`` (default: the run's noise RNG); ``timesteps`` fixes t (validation).
        """
        return self.denoise_loss(self.denoise_inputs(batch, generator, timesteps))

    def denoise_inputs(self, batch: dict, generator: torch.Generator | None = None,
                       timesteps: int | None = None) -> dict[str, torch.Tensor]:
        """Everything :meth:`denoise_loss` reads, as device tensors: noisy latents, timesteps, text
        conditioning, target, and the batch entries the loss and the method's U-Net call use."""
        cfg, run = self.cfg, self.run
        gen = generator if generator is not None else self.rng.generator
        latents = self.latents_of(batch, generator)
        if self._text_in_graph:  # token ids in, the encoders run inside denoise_loss (and its graph)
            ids1, ids2 = self.method.caption_ids(batch["captions"])
            text = {"ids1": ids1.to(latents.device), "ids2": ids2.to(latents.device)}
        else:
            context, pooled = self.text_of(batch)
            text = {"context": context, "text_embeds": pooled}
        eps = noise.noise_like(latents, gen, cfg.noise_offset, cfg.noise_offset_random_strength,
                               cfg.adaptive_noise_scale, cfg.multires_noise_iterations, cfg.multires_noise_discount)
        if timesteps is None:
            t = noise.sample_timesteps(latents.shape[0], cfg.min_timestep, cfg.max_timestep, gen, latents.device)
        else:
            t = torch.full((latents.shape[0],), int(timesteps), dtype=torch.long, device=latents.device)
        noisy = noise.add_noise(run.scheduler, latents,
                                noise.perturb_noise(eps, gen, cfg.ip_noise_gamma, cfg.ip_noise_gamma_random_strength), t)
        ids = time_ids(batch["original_sizes_hw"], batch["crop_top_lefts"], batch["target_sizes_hw"])
        inputs = {"noisy": noisy, "timesteps": t, "time_ids": ids.to(latents.device), **text,
                  "target": noise.target_for(run.scheduler, latents, eps, t, cfg.v_parameterization)}
        extra = {"loss_mask": losses.loss_mask(batch, cfg.masked_loss), "loss_weights": batch.get("loss_weights")}
        extra.update({k: batch.get(k) for k in getattr(self.method, "unet_batch_keys", ())})
        for key, value in extra.items():
            if value is not None:
                inputs[key] = value.to(latents.device, non_blocking=True)
        return inputs

    def denoise_loss(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The U-Net's prediction for ``inputs`` (see :meth:`denoise_inputs`) and its weighted loss."""
        cfg, run = self.cfg, self.run
        t = inputs["timesteps"]
        if "ids1" in inputs:
            # no autocast cache: a capture must not keep casts made outside it (the weights are
            # stored in the compute dtype anyway)
            with run.accelerator.autocast(autocast_handler=AutocastKwargs(cache_enabled=False)):
                context, pooled = self.method.encode_caption_ids(inputs["ids1"], inputs["ids2"])
            context, pooled = context.to(run.weight_dtype), pooled.to(run.weight_dtype)
        else:
            context, pooled = inputs["context"], inputs["text_embeds"]
        added = unet_added_cond(pooled, inputs["time_ids"])
        with self.unet_autocast():
            pred = self.method.unet_forward(run, inputs["noisy"], t, context, added, inputs)
        huber_c = losses.huber_c_for(t, run.scheduler, cfg.loss_type, cfg.huber_schedule, cfg.huber_c, cfg.huber_scale) \
            if cfg.loss_type in ("huber", "smooth_l1") else cfg.huber_c
        per_sample = losses.per_sample_loss(pred.float(), inputs["target"].float(), cfg.loss_type, huber_c,
                                            inputs.get("loss_mask"))
        per_sample = losses.apply_loss_weighting(
            per_sample, t, run.scheduler, cfg.v_parameterization, inputs.get("loss_weights"), cfg.min_snr_gamma,
            cfg.scale_v_pred_loss_like_noise_pred, cfg.v_pred_like_loss, cfg.debiased_estimation_loss)
        return per_sample.mean()

    def step(self, batch: dict) -> torch.Tensor:
        """Forward, backward and (on an accumulation boundary) the optimizer step; returns the loss.

        With ``--fused_backward_pass`` each parameter is stepped by a hook as its gradient is ready,
        so here only the scheduler moves.
        """
        acc, cfg = self.run.accelerator, self.cfg
        device_steps = self.graphed is not None and self.fused is not None  # see FusedBackward.use_device_scalars
        with acc.accumulate(*self.trained):
            if device_steps:
                self.fused.before_step()
            if self.graphed is not None:
                inputs = self.denoise_inputs(batch)
                if self._step_in_graph is None:
                    self._step_in_graph = self._optimizer_joins_graph(inputs)
                if self._step_in_graph:  # the replay runs no Python: this step's numbers go to the device
                    adafactor = inner_optimizer(self.optimizer)
                    number = adafactor.steps_taken() + 1
                    adafactor.fill_device_factors(number)
                loss = self.graphed.loss_and_backward(inputs)
                if self._step_in_graph:
                    adafactor.count_step(number)
                    adafactor._opt_called = True  # what torch's LR schedulers check to see the optimizer stepped
            else:
                loss = self.loss_of(batch)
                acc.backward(loss)
            if device_steps:
                self.fused.after_step()
            if self._step_in_graph:
                pass  # stepped inside loss_and_backward (_backward_and_step)
            elif self.fused is None:
                if acc.sync_gradients and self.average_gradients is not None:
                    self.average_gradients()
                if acc.sync_gradients and cfg.max_grad_norm:
                    acc.clip_grad_norm_(self.trained_params, cfg.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            elif hasattr(self.fused, "finish"):
                self.fused.finish()  # --fused_optimizer_groups: groups a parameter without gradient left open
            self.lr_scheduler.step()
        # Detached: a loss held with its autograd graph would keep last step's gradient-accumulation
        # nodes (bound to the stream they ran on) alive into the next step's CUDA graph capture.
        return loss.detach()

    # -----------------------------------------------------------------------------------------
    def train(self) -> Path | None:
        """Run to the end; returns the final saved file (main process)."""
        run, cfg, acc = self.run, self.cfg, self.run.accelerator
        p = run.progress
        run.started_at = time.time()
        bar = self._bar = tqdm(total=self.max_steps, initial=p.global_step, disable=not acc.is_local_main_process,
                               desc="steps", dynamic_ncols=True)
        loss_sum = torch.zeros((), device=acc.device)
        loss_count = 0
        if cfg.sample_at_first and p.global_step == 0:
            self._sample(epoch=0, step=0)
        while p.global_step < self.max_steps and p.epoch < self.num_epochs:
            # Epochs are 0-based for the data (accelerate's loader passes its pass counter to set_epoch);
            # setting it on the loader keeps the order right after a resume too.
            loader = acc.skip_first_batches(self.loader, p.step_in_epoch) if p.step_in_epoch else self.loader
            for each in {id(self.loader): self.loader, id(loader): loader}.values():
                if hasattr(each, "set_epoch"):
                    each.set_epoch(p.epoch)
            run.data.set_epoch(p.epoch)
            for module in self.trained:
                module.train()
            for batch in loader:
                run.data.set_current_step(p.global_step)
                # noise follows the batch's place in the epoch, not the process that trains it
                self.rng.generator.manual_seed(distributed.noise_seed(
                    cfg.seed or 0, p.epoch, distributed.batch_index(p.step_in_epoch, acc.process_index,
                                                                    acc.num_processes)))
                loss = self.step(batch)
                p.step_in_epoch += 1
                loss_sum += loss.detach()
                loss_count += 1
                self.validation.add_train_loss(loss)
                if not acc.sync_gradients:
                    continue
                self.method.after_optimizer_step(run)
                p.global_step += 1
                self.weight_hashes(p.global_step, self.trained_params)
                bar.update(1)
                if p.global_step % cfg.log_every_n_steps == 0 or p.global_step >= self.max_steps:
                    self._log(bar, loss_sum, loss_count)
                    loss_sum.zero_()
                    loss_count = 0
                self._step_end_saves()
                self.validation.after_step(bar)
                if p.global_step >= self.max_steps:
                    break
            else:
                p.epoch += 1
                p.step_in_epoch = 0
                self.validation.after_epoch(bar)
                self._epoch_end_saves()
                continue
            break
        self.validation.after_training(bar)
        bar.close()
        return self._final_save()

    def _log(self, bar, loss_sum: torch.Tensor, count: int) -> None:
        """Read the device-side loss sum (the only host sync), show it, and stop on NaN/inf."""
        avg = self.run.accelerator.reduce(loss_sum / max(count, 1), reduction="mean").item()  # over processes
        if not math.isfinite(avg):
            raise self._stopping(save_guard.broken_weights_error(self.run.progress.global_step, self.last_good_save,
                                                                 f"the loss became {avg}"))
        lr = self.lr_scheduler.get_last_lr()[0]
        bar.set_postfix(loss=f"{avg:.4f}", lr=f"{lr:.2e}", **self.validation.postfix())
        logs = {"loss/average": avg, "lr/current": lr}
        if self.cfg.log_prefix:
            logs = {self.cfg.log_prefix + k: v for k, v in logs.items()}
        self.run.accelerator.log(logs, step=self.run.progress.global_step)

    # -----------------------------------------------------------------------------------------
    def _save(self, stem: str, epoch: int, step: int) -> Path | None:
        acc = self.run.accelerator
        acc.wait_for_everyone()
        if distributed.is_sharded(acc):  # a collective: every process helps gather the full weights
            self.run.gathered = distributed.gather_trained(acc, self.wrapped, self.trained)
        path = None
        try:
            if acc.is_main_process:
                path = self.method.save(self.run, stem, epoch, step)
                logger.info("saved %s", path)
                self.last_good_save = path
        finally:
            self.run.gathered = None
        acc.wait_for_everyone()
        return path

    def _check_weights(self) -> None:
        """Refuse to save (or rotate) when a trained weight is NaN/inf or exploded."""
        if not save_guard.weights_are_sound(self.trained_params, self.run.accelerator):
            raise self._stopping(save_guard.broken_weights_error(self.run.progress.global_step, self.last_good_save))

    def _stopping(self, error: Exception) -> Exception:
        """Close the progress bar (so the one-line message starts its own line) and return ``error``."""
        bar = getattr(self, "_bar", None)
        if bar is not None:
            bar.close()
        return error

    def _save_state(self, name: str) -> None:
        acc = self.run.accelerator
        self.run.progress.rng_state = self.rng.state()
        state_io.save_state(acc, self.out / name, self.run.progress)  # temp folder, renamed when complete

    def _periodic_save(self, per: str, counter: int, every: int | None, keep_last: int | None,
                       keep_last_state: int | None) -> None:
        """An every-N-steps or every-N-epochs save (``per``: "step" or "epoch"), rotating old ones."""
        cfg, p = self.cfg, self.run.progress
        key = {per: counter}
        epoch = p.epoch if per == "epoch" else p.epoch + 1
        self._check_weights()
        self._save(ckpt.save_stem(cfg.output_name, **key), epoch, p.global_step)
        ckpt.remove_old(self.out, cfg.output_name, self._ext(), keep_last, counter, per, every)
        if cfg.save_state:
            self._save_state(ckpt.state_dir_name(cfg.output_name, **key))
            ckpt.remove_old(self.out, cfg.output_name, "", keep_last_state or keep_last, counter, per, every,
                            state=True)

    def _step_end_saves(self) -> None:
        cfg, p = self.cfg, self.run.progress
        every = cfg.save_every_n_steps
        if every and p.global_step % every == 0 and p.global_step < self.max_steps:
            self._periodic_save("step", p.global_step, every, cfg.save_last_n_steps, cfg.save_last_n_steps_state)
        if cfg.sample_every_n_steps and p.global_step % cfg.sample_every_n_steps == 0 and not cfg.sample_every_n_epochs:
            self._sample(epoch=p.epoch + 1, step=p.global_step)

    def _epoch_end_saves(self) -> None:
        cfg, p = self.cfg, self.run.progress
        every = cfg.save_every_n_epochs
        if every and p.epoch % every == 0 and p.epoch < self.num_epochs:
            self._periodic_save("epoch", p.epoch, every, cfg.save_last_n_epochs, cfg.save_last_n_epochs_state)
        if cfg.sample_every_n_epochs and p.epoch % cfg.sample_every_n_epochs == 0:
            self._sample(epoch=p.epoch, step=p.global_step)

    def _final_save(self) -> Path | None:
        cfg, p = self.cfg, self.run.progress
        self._check_weights()
        path = self._save(ckpt.save_stem(cfg.output_name), p.epoch, p.global_step)
        if cfg.save_state or cfg.save_state_on_train_end:
            self._save_state(ckpt.state_dir_name(cfg.output_name))
        self.run.accelerator.end_training()
        return path

    def _ext(self) -> str:
        fmt = self.cfg.save_model_as or "safetensors"
        return "safetensors" if fmt in ("safetensors", "diffusers_safetensors") else fmt

    def _sample(self, epoch: int, step: int) -> None:
        if self.sampler is None or not self.cfg.sample_prompts:
            return
        acc = self.run.accelerator
        acc.wait_for_everyone()
        if acc.is_main_process:
            for module in self.trained:
                module.eval()
            self.sampler(self.run, epoch=epoch, step=step)
            for module in self.trained:
                module.train()
        acc.wait_for_everyone()
