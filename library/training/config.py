"""The typed configuration the shared training loop reads.

Scripts parse sd-scripts' options into an ``argparse.Namespace``; :meth:`TrainConfig.from_namespace`
turns it into this frozen dataclass at the script boundary, so the library never sees the
namespace. Method-specific options (LoRA, block learning rates, ...) go to the method's own
constructor as plain values.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass(frozen=True)
class TrainConfig:
    # model
    pretrained_model_name_or_path: str = ""
    vae: Optional[str] = None
    tokenizer_cache_dir: Optional[str] = None
    v_parameterization: bool = False
    lowram: bool = False
    disable_mmap_load_safetensors: bool = False
    # precision / memory
    mixed_precision: str = "no"
    full_fp16: bool = False
    full_bf16: bool = False
    fp8_base: bool = False
    fp8_base_unet: bool = False
    no_half_vae: bool = False
    gradient_checkpointing: bool = False
    gradient_accumulation_steps: int = 1
    torch_compile: bool = False
    dynamo_backend: str = "inductor"
    dynamo_mode: Optional[str] = None
    dynamo_fullgraph: bool = False
    dynamo_dynamic: bool = False
    cuda_graphs: str = "auto"  # "auto": graph the U-Net step where safe (library.training.cuda_graphs); "off"
    fused_backward_pass: bool = False
    # several processes (library.training.distributed)
    ddp_timeout: Optional[int] = None
    ddp_gradient_as_bucket_view: bool = False
    ddp_static_graph: bool = False
    deepspeed: bool = False
    zero_stage: int = 2
    offload_optimizer_device: Optional[str] = None
    offload_optimizer_nvme_path: Optional[str] = None
    offload_param_device: Optional[str] = None
    offload_param_nvme_path: Optional[str] = None
    zero3_init_flag: bool = False
    zero3_save_16bit_model: bool = False
    fp16_master_weights_and_gradients: bool = False
    # noise / loss
    min_timestep: int = 0
    max_timestep: int = 1000
    noise_offset: Optional[float] = None
    noise_offset_random_strength: bool = False
    adaptive_noise_scale: Optional[float] = None
    multires_noise_iterations: Optional[int] = None
    multires_noise_discount: float = 0.3
    ip_noise_gamma: Optional[float] = None
    ip_noise_gamma_random_strength: bool = False
    zero_terminal_snr: bool = False
    min_snr_gamma: Optional[float] = None
    scale_v_pred_loss_like_noise_pred: bool = False
    v_pred_like_loss: Optional[float] = None
    debiased_estimation_loss: bool = False
    loss_type: str = "l2"
    huber_schedule: str = "snr"
    huber_c: float = 0.1
    huber_scale: float = 1.0
    masked_loss: bool = False
    # optimizer / schedule
    optimizer_type: str = ""
    optimizer_args: tuple[str, ...] = ()
    learning_rate: float = 2e-6
    max_grad_norm: float = 1.0
    lr_scheduler: str = "constant"
    lr_warmup_steps: Any = 0
    lr_decay_steps: Any = 0
    lr_scheduler_num_cycles: float = 1
    lr_scheduler_power: float = 1.0
    lr_scheduler_args: tuple[str, ...] = ()
    lr_scheduler_type: Optional[str] = None
    lr_scheduler_timescale: Optional[int] = None
    lr_scheduler_min_lr_ratio: Optional[float] = None
    # length, seed, data loading
    max_train_steps: int = 1600
    max_train_epochs: Optional[int] = None
    seed: Optional[int] = None
    max_data_loader_n_workers: int = 8
    persistent_data_loader_workers: bool = False
    max_token_length: Optional[int] = None
    weighted_captions: bool = False
    # caching
    cache_latents: bool = False
    cache_latents_to_disk: bool = False
    vae_batch_size: int = 1
    skip_cache_check: bool = False
    cache_text_encoder_outputs: bool = False
    cache_text_encoder_outputs_to_disk: bool = False
    # saving
    output_dir: str = ""
    output_name: Optional[str] = None
    save_model_as: Optional[str] = None
    save_precision: Optional[str] = None
    save_every_n_epochs: Optional[int] = None
    save_every_n_steps: Optional[int] = None
    save_last_n_epochs: Optional[int] = None
    save_last_n_steps: Optional[int] = None
    save_last_n_epochs_state: Optional[int] = None
    save_last_n_steps_state: Optional[int] = None
    save_state: bool = False
    save_state_on_train_end: bool = False
    resume: Optional[str] = None
    no_metadata: bool = False
    training_comment: Optional[str] = None
    metadata: dict = field(default_factory=dict)  # --metadata_* values, keys without the prefix
    # sampling
    sample_prompts: Optional[str] = None
    sample_every_n_steps: Optional[int] = None
    sample_every_n_epochs: Optional[int] = None
    sample_at_first: bool = False
    sample_sampler: str = "ddim"
    # logging
    logging_dir: Optional[str] = None
    log_with: Optional[str] = None
    log_prefix: Optional[str] = None
    log_tracker_name: Optional[str] = None
    log_every_n_steps: int = 10
    # validation loss (library/training/validation.py; the split itself is per dataset)
    validation_seed: Optional[int] = None
    validate_every_n_steps: Optional[int] = None
    validate_every_n_epochs: Optional[int] = None
    max_validation_steps: Optional[int] = None
    # start position, save ratio, fused optimizer groups, offloaded checkpointing
    initial_epoch: Optional[int] = None
    initial_step: Optional[int] = None
    skip_until_initial_step: bool = False
    save_n_epoch_ratio: Optional[int] = None
    fused_optimizer_groups: Optional[int] = None
    cpu_offload_checkpointing: bool = False

    @classmethod
    def from_namespace(cls, ns: Any) -> "TrainConfig":
        """Take every field this class knows from a parsed namespace (missing ones keep defaults)."""
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name == "metadata":
                continue
            if hasattr(ns, f.name) and getattr(ns, f.name) is not None:
                value = getattr(ns, f.name)
                values[f.name] = tuple(value) if isinstance(value, list) else value
        values["metadata"] = {k[len("metadata_"):]: v for k, v in vars(ns).items()
                              if k.startswith("metadata_") and v is not None}
        return cls(**values)

    @property
    def weight_dtype_name(self) -> str:
        """Dtype of frozen weights: the mixed-precision dtype (fp32 without mixed precision)."""
        return {"fp16": "fp16", "bf16": "bf16"}.get(self.mixed_precision, "fp32")
