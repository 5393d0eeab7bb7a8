"""Read and write SDXL checkpoints: Stability-AI single files (.safetensors/.ckpt) and diffusers folders.

Loading is lean: tensors are read one at a time from a memory-mapped file, converted, cast to the
requested dtype, put on the requested device, and assigned into modules that were built without
storage, so the host never holds a second full copy of the weights. Saving writes to a temporary
file (or folder) beside the target and renames it into place.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from library.errors import UserError
from library.models import convert_keys as ck
from library.models import sdxl
from library.models.atomic import atomic_path, replace_dir

logger = logging.getLogger(__name__)

LOGIT_SCALE_KEY = ck.TE2_PREFIX + "logit_scale"
DEFAULT_LOGIT_SCALE = 4.6052  # ln(100), OpenCLIP's clamped value, as in SDXL base 1.0

# Tensors found in real files that belong to no module: kept verbatim and written back on save.
KEPT_EXTRAS = (
    ck.TE2_PREFIX + "logit_scale",
    ck.TE1_PREFIX + "text_model.embeddings.position_ids",
    ck.TE1_PREFIX + "embeddings.position_ids",
)
# Tensors found in real files that we drop on load (not used by training or inference).
IGNORED_PREFIXES = ("denoiser.", "model_ema.", "betas", "alphas_cumprod", "alphas_cumprod_prev",
                    "sqrt_", "log_one_minus", "posterior_", "lvlb_weights", "logvar",
                    ck.TE2_PREFIX + "attn_mask", ck.TE2_PREFIX + "text_projection.weight.")


class TensorFile:
    """A read-only, lazily read view of a checkpoint's tensors (safetensors via mmap, or .ckpt)."""

    def __init__(self, path: str | os.PathLike, mmap: bool = True):
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"{self.path}: file not found")
        self.metadata: dict[str, str] = {}
        self._st = None
        self._sd: dict[str, torch.Tensor] | None = None
        if self.path.suffix.lower() == ".safetensors":
            self._open_safetensors(mmap)
        elif self.path.suffix.lower() in (".ckpt", ".pt", ".pth", ".bin"):
            self._open_pickle()
        else:
            raise UserError(f"{self.path}: unknown checkpoint type; expected .safetensors or .ckpt")

    def _open_safetensors(self, mmap: bool) -> None:
        try:
            if mmap:
                self._st = safe_open(str(self.path), framework="pt", device="cpu")
                self.metadata = dict(self._st.metadata() or {})
            else:
                from safetensors.torch import load

                data = self.path.read_bytes()
                self._sd = load(data)
                with safe_open(str(self.path), framework="pt") as f:
                    self.metadata = dict(f.metadata() or {})
        except Exception as exc:  # safetensors raises several types for a broken header
            raise UserError(f"{self.path}: not a readable safetensors file (truncated or another format?): {exc}")

    def _open_pickle(self) -> None:
        try:
            obj = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:
            raise UserError(f"{self.path}: cannot read as a tensor-only checkpoint (pickled code is never "
                            f"executed; convert it to .safetensors): {exc}")
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise UserError(f"{self.path}: no state dict inside")
        self._sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}

    def keys(self) -> list[str]:
        return list(self._st.keys()) if self._st is not None else list(self._sd)  # type: ignore[arg-type]

    def shape(self, key: str) -> tuple[int, ...]:
        if self._st is not None:
            return tuple(self._st.get_slice(key).get_shape())
        return tuple(self._sd[key].shape)  # type: ignore[index]

    def get(self, key: str) -> torch.Tensor:
        if self._st is not None:
            return self._st.get_tensor(key)
        return self._sd[key]  # type: ignore[index]


# ---------------------------------------------------------------------------------------------
# Recognising what a file holds
# ---------------------------------------------------------------------------------------------
def check_is_sdxl(keys: Iterable[str], source: str) -> None:
    """Raise a clear error when a file holds another model family than SDXL."""
    keys = list(keys)
    has = lambda p: any(k.startswith(p) for k in keys)  # noqa: E731
    if has("double_blocks.") or has("model.diffusion_model.double_blocks.") or has("transformer.double"):
        raise UserError(f"{source}: this is a Flux checkpoint, not SDXL")
    if has("model.diffusion_model.joint_blocks.") or has("joint_blocks."):
        raise UserError(f"{source}: this is an SD3 checkpoint, not SDXL")
    if has("cond_stage_model.model."):
        raise UserError(f"{source}: this is a Stable Diffusion 2.x checkpoint, not SDXL")
    if has("cond_stage_model.transformer."):
        raise UserError(f"{source}: this is a Stable Diffusion 1.x checkpoint, not SDXL")
    if has(ck.UNET_PREFIX) and not has(ck.UNET_PREFIX + "label_emb."):
        raise UserError(f"{source}: the U-Net has no label_emb (size conditioning); this is not an SDXL model")
    if not has(ck.UNET_PREFIX):
        raise UserError(f"{source}: no SDXL U-Net tensors (model.diffusion_model.*); expected a Stability-AI "
                        "single-file SDXL checkpoint")


def split_components(tf: TensorFile) -> tuple[dict[str, list[str]], dict[str, torch.Tensor]]:
    """Group a single file's keys by component (prefix removed); collect the kept extras."""
    groups: dict[str, list[str]] = {c: [] for c in ck.COMPONENT_PREFIXES}
    extras: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key in tf.keys():
        if key in KEPT_EXTRAS:
            extras[key] = tf.get(key)
            continue
        if key.startswith(IGNORED_PREFIXES):
            continue
        for comp, prefix in ck.COMPONENT_PREFIXES.items():
            if key.startswith(prefix):
                groups[comp].append(key[len(prefix):])
                break
        else:
            unknown.append(key)
    if unknown:
        raise UserError(f"{tf.path}: {len(unknown)} unexpected tensor(s) for an SDXL checkpoint, e.g. "
                        f"{unknown[:3]}; expected only model.diffusion_model.*, first_stage_model.*, "
                        "conditioner.embedders.0/1.*")
    return groups, extras


# ---------------------------------------------------------------------------------------------
# SAI keys -> diffusers/transformers state dicts
# ---------------------------------------------------------------------------------------------
Cast = Callable[[torch.Tensor], torch.Tensor]


def _caster(dtype: torch.dtype | None, device: torch.device | str) -> Cast:
    def cast(t: torch.Tensor) -> torch.Tensor:
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        return t.to(device)
    return cast


def _convert(source: str, keys: list[str], fn: Callable[[str], str]) -> Iterator[tuple[str, str]]:
    for key in keys:
        try:
            yield key, fn(key)
        except KeyError as exc:
            raise UserError(f"{source}: {exc.args[0]}; the file does not have the SDXL layout") from None


def unet_state_from_sai(tf: TensorFile, keys: list[str], cast: Cast) -> dict[str, torch.Tensor]:
    """Diffusers U-Net state dict from SAI-named keys."""
    up_attention = {int(k.split(".")[1]) // 3 for k in keys
                    if k.startswith("output_blocks.") and ".transformer_blocks." in k}
    out = {}
    for key, target in _convert(str(tf.path), keys, lambda k: ck.unet_sai_to_diffusers(k, 2, up_attention)):
        out[target] = cast(tf.get(ck.UNET_PREFIX + key))
    return out


def vae_state_from_sai(tf: TensorFile, keys: list[str], cast: Cast, prefix: str = ck.VAE_PREFIX) -> dict[str, torch.Tensor]:
    """Diffusers ``AutoencoderKL`` state dict from LDM-named keys."""
    levels = len({k.split(".")[2] for k in keys if k.startswith("encoder.down.")})
    out = {}
    for key, target in _convert(str(tf.path), keys, lambda k: ck.vae_sai_to_diffusers(k, levels)):
        out[target] = cast(ck.convert_vae_tensor(target, tf.get(prefix + key), to_sai=False))
    return out


def te1_state_from_sai(tf: TensorFile, keys: list[str], cast: Cast) -> dict[str, torch.Tensor]:
    """Flattened TE1 state dict (no ``text_model.`` level) from the file's HF-named keys."""
    return {ck.te1_sai_to_flat(k): cast(tf.get(ck.TE1_PREFIX + k)) for k in keys}


def te2_state_from_sai(tf: TensorFile, keys: list[str], cast: Cast) -> dict[str, torch.Tensor]:
    """``CLIPTextModelWithProjection`` state dict from OpenCLIP-named keys."""
    try:
        pairs = ck.convert_te2_to_hf(keys, lambda k: tf.get(ck.TE2_PREFIX + k))
        return {k: cast(v) for k, v in pairs}
    except KeyError as exc:
        raise UserError(f"{tf.path}: {exc.args[0]}; the file does not have the SDXL layout") from None


# ---------------------------------------------------------------------------------------------
# Assembling modules
# ---------------------------------------------------------------------------------------------
def assign_weights(kind: str, config, state: dict[str, torch.Tensor], source: str) -> torch.nn.Module:
    """Build a component with empty weights and assign ``state`` into it; strict on keys."""
    model = sdxl.build_on_meta(kind, config)
    if kind == "te1" and next(iter(model.state_dict())).startswith("text_model."):
        state = {"text_model." + k: v for k, v in state.items()}
    result = model.load_state_dict(state, strict=False, assign=True)
    names = {"unet": "U-Net", "vae": "VAE", "te1": "text encoder 1", "te2": "text encoder 2"}
    if result.missing_keys:
        raise UserError(f"{source}: {names[kind]} is missing {len(result.missing_keys)} tensor(s), e.g. "
                        f"{result.missing_keys[:3]}; the file is incomplete or not an SDXL checkpoint")
    if result.unexpected_keys:
        raise UserError(f"{source}: {names[kind]} has {len(result.unexpected_keys)} unexpected tensor(s), e.g. "
                        f"{result.unexpected_keys[:3]}")
    for name, p in model.named_parameters():
        if p.is_meta:
            raise UserError(f"{source}: {names[kind]} tensor {name} was not loaded")
    return model.eval().requires_grad_(False)


def models_from_states(states: dict[str, dict[str, torch.Tensor]], source: str) -> dict[str, torch.nn.Module]:
    """Infer every component's config from its state's shapes and build it."""
    shapes = {c: {k: tuple(v.shape) for k, v in s.items()} for c, s in states.items()}
    te2_cfg = sdxl.infer_clip_config(shapes["te2"], with_projection=True)
    configs = {
        "te2": te2_cfg,
        "te1": sdxl.infer_clip_config(shapes["te1"], with_projection=False),
        "unet": sdxl.infer_unet_config(shapes["unet"], pooled_dim=te2_cfg.projection_dim),
        "vae": sdxl.infer_vae_config(shapes["vae"]),
    }
    return {c: assign_weights(c, configs[c], states.pop(c), source) for c in ("unet", "vae", "te1", "te2")}


def load_single_file(path: str | os.PathLike, dtype: torch.dtype | None = None,
                     device: torch.device | str = "cpu", mmap: bool = True) -> sdxl.SDXLModels:
    """Load an SDXL single-file checkpoint into diffusers/transformers modules.

    ``dtype`` None keeps each tensor's stored dtype (an exact round trip); otherwise floating
    tensors are cast while read.
    """
    tf = TensorFile(path, mmap=mmap)
    check_is_sdxl(tf.keys(), str(tf.path))
    groups, extras = split_components(tf)
    for comp, label in (("vae", "VAE (first_stage_model.*)"), ("te1", "text encoder 1 (conditioner.embedders.0.*)"),
                        ("te2", "text encoder 2 (conditioner.embedders.1.*)")):
        if not groups[comp]:
            raise UserError(f"{tf.path}: no {label} tensors; a full SDXL checkpoint has U-Net, VAE and both text "
                            "encoders")
    cast = _caster(dtype, device)
    states = {
        "te2": te2_state_from_sai(tf, groups["te2"], cast),
        "te1": te1_state_from_sai(tf, groups["te1"], cast),
        "unet": unet_state_from_sai(tf, groups["unet"], cast),
        "vae": vae_state_from_sai(tf, groups["vae"], cast),
    }
    m = models_from_states(states, str(tf.path))
    return sdxl.SDXLModels(m["unet"], m["vae"], m["te1"], m["te2"], extras=extras, metadata=tf.metadata,
                           source=str(tf.path))


# ---------------------------------------------------------------------------------------------
# Saving a single file
# ---------------------------------------------------------------------------------------------
SAVE_DTYPES = {None: None, "float": torch.float32, "fp32": torch.float32, "fp16": torch.float16,
               "bf16": torch.bfloat16}


def save_dtype(name: str | None) -> torch.dtype | None:
    """The torch dtype for a ``--save_precision`` value (None keeps the model's dtype)."""
    if name not in SAVE_DTYPES:
        raise UserError(f"--save_precision: {name!r} is not one of float, fp16, bf16")
    return SAVE_DTYPES[name]


def _te1_flat_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {(k[len("text_model."):] if k.startswith("text_model.") else k): v for k, v in model.state_dict().items()}


def sai_state_dict(models: sdxl.SDXLModels, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The whole model as a single-file (SAI layout) state dict, tensors cast to ``dtype``."""
    def put(key: str, t: torch.Tensor) -> None:
        t = t.detach()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        out[key] = t if t.is_meta else t.to("cpu").contiguous()

    out: dict[str, torch.Tensor] = {}
    unet_sd = models.unet.state_dict()
    up_attention = {i for i, b in enumerate(models.unet.up_blocks) if getattr(b, "attentions", None)}
    lpb = models.unet.config.layers_per_block
    for k, v in unet_sd.items():
        put(ck.UNET_PREFIX + ck.unet_diffusers_to_sai(k, lpb, up_attention), v)
    levels = len(models.vae.config.block_out_channels)
    for k, v in models.vae.state_dict().items():
        put(ck.VAE_PREFIX + ck.vae_diffusers_to_sai(k, levels), ck.convert_vae_tensor(k, v, to_sai=True))
    for k, v in _te1_flat_state(models.text_encoder1).items():
        put(ck.TE1_PREFIX + ck.te1_flat_to_sai(k), v)
    for k, v in ck.convert_te2_to_openclip(models.text_encoder2.state_dict()).items():
        put(ck.TE2_PREFIX + k, v)
    for k, v in models.extras.items():
        put(k, v)
    if LOGIT_SCALE_KEY not in out:
        # Diffusers folders do not carry OpenCLIP's logit_scale; write the value SDXL's TE2 has (ln 100).
        put(LOGIT_SCALE_KEY, torch.tensor(DEFAULT_LOGIT_SCALE, dtype=torch.float32))
    return out


def save_single_file(models: sdxl.SDXLModels, path: str | os.PathLike, save_precision: str | None = None,
                     metadata: dict[str, str] | None = None, epoch: int = 0, global_step: int = 0) -> Path:
    """Write the single-file checkpoint (``.safetensors`` with metadata, or ``.ckpt``) atomically."""
    path = Path(path)
    state = sai_state_dict(models, save_dtype(save_precision))
    with atomic_path(path, size_hint=sum(t.numel() * t.element_size() for t in state.values())) as tmp:
        if path.suffix.lower() == ".safetensors":
            save_file(state, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})
        else:
            torch.save({"state_dict": state, "epoch": epoch, "global_step": global_step}, tmp)
    return path


# ---------------------------------------------------------------------------------------------
# Diffusers folders
# ---------------------------------------------------------------------------------------------
_SUBFOLDERS = {"unet": "unet", "vae": "vae", "te1": "text_encoder", "te2": "text_encoder_2"}


def _read_folder_state(folder: Path, cast: Cast) -> dict[str, torch.Tensor]:
    files = sorted(p for p in folder.glob("*.safetensors") if ".fp16." not in p.name)
    files = files or sorted(folder.glob("*.safetensors"))
    if not files:
        files = sorted(folder.glob("*.bin"))
    if not files:
        raise UserError(f"{folder}: no weight files (*.safetensors or *.bin)")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        tf = TensorFile(f)
        for k in tf.keys():
            state[k] = cast(tf.get(k))
    return state


def load_diffusers_folder(path: str | os.PathLike, dtype: torch.dtype | None = None,
                          device: torch.device | str = "cpu") -> sdxl.SDXLModels:
    """Load a diffusers SDXL folder (``unet/``, ``vae/``, ``text_encoder/``, ``text_encoder_2/``)."""
    root = Path(path)
    missing = [s for s in _SUBFOLDERS.values() if not (root / s).is_dir()]
    if missing:
        raise UserError(f"{root}: not a diffusers SDXL folder (missing {', '.join(missing)}/)")
    cast = _caster(dtype, device)
    states = {c: _read_folder_state(root / s, cast) for c, s in _SUBFOLDERS.items()}
    states["te1"] = {(k[len("text_model."):] if k.startswith("text_model.") else k): v
                     for k, v in states["te1"].items()}
    states["te2"] = {k: v for k, v in states["te2"].items() if not k.endswith("position_ids")}
    m = models_from_states(states, str(root))
    return sdxl.SDXLModels(m["unet"], m["vae"], m["te1"], m["te2"], source=str(root))


def save_diffusers_folder(models: sdxl.SDXLModels, path: str | os.PathLike, save_precision: str | None = None,
                          safe_serialization: bool = True) -> Path:
    """Write a diffusers ``StableDiffusionXLPipeline`` folder, replacing ``path`` only when complete."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    from library.models.tokenizers import load_tokenizers

    root = Path(path)
    tok1, tok2 = load_tokenizers()
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(vae=models.vae, text_encoder=models.text_encoder1,
                                     text_encoder_2=models.text_encoder2, tokenizer=tok1, tokenizer_2=tok2,
                                     unet=models.unet, scheduler=scheduler)
    dtype = save_dtype(save_precision)
    tmp = root.with_name(root.name + ".tmp-saving")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if dtype is None:
            pipe.save_pretrained(tmp, safe_serialization=safe_serialization)
        else:
            _save_pipe_cast(pipe, tmp, dtype, safe_serialization)
        replace_dir(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _save_pipe_cast(pipe, tmp: Path, dtype: torch.dtype, safe_serialization: bool) -> None:
    """Save with weights cast to ``dtype`` one component at a time, restoring each afterwards."""
    pipe.save_config(tmp)  # model_index.json
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, name)
        original = next(module.parameters()).dtype
        module.to(dtype)
        try:
            module.save_pretrained(tmp / name, safe_serialization=safe_serialization)
        finally:
            module.to(original)
    pipe.tokenizer.save_pretrained(tmp / "tokenizer")
    pipe.tokenizer_2.save_pretrained(tmp / "tokenizer_2")
    pipe.scheduler.save_pretrained(tmp / "scheduler")


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------
def load_vae(path: str | os.PathLike, dtype: torch.dtype | None = None, device: torch.device | str = "cpu"):
    """Load a VAE given by ``--vae``: a single file (LDM or diffusers keys) or a diffusers folder."""
    p = Path(path)
    if p.is_dir():
        folder = p / "vae" if (p / "vae").is_dir() else p
        state = _read_folder_state(folder, _caster(dtype, device))
    else:
        tf = TensorFile(p)
        keys = tf.keys()
        prefix = ck.VAE_PREFIX if any(k.startswith(ck.VAE_PREFIX) for k in keys) else ""
        vae_keys = [k[len(prefix):] for k in keys if k.startswith(prefix) and not k.startswith("loss.")]
        if any(k.startswith("encoder.down_blocks.") for k in vae_keys):
            state = {k: _caster(dtype, device)(tf.get(prefix + k)) for k in vae_keys}
        else:
            state = vae_state_from_sai(tf, vae_keys, _caster(dtype, device), prefix=prefix)
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    if not any(k.startswith(("encoder.", "decoder.")) for k in shapes):
        raise UserError(f"{p}: no VAE tensors in this file (it holds {len(shapes)} other tensors); give an "
                        "SDXL VAE (.safetensors single file or a diffusers vae folder)")
    return assign_weights("vae", sdxl.infer_vae_config(shapes), state, str(p))


def load_sdxl(path: str | os.PathLike, dtype: torch.dtype | None = None, device: torch.device | str = "cpu",
              vae: str | os.PathLike | None = None, mmap: bool = True) -> sdxl.SDXLModels:
    """Load SDXL from a single file, a diffusers folder or (when online) a Hugging Face hub id."""
    p = Path(path)
    if p.is_dir():
        models = load_diffusers_folder(p, dtype, device)
    elif p.is_file():
        models = load_single_file(p, dtype, device, mmap=mmap)
    elif str(path).count("/") == 1 and not str(path).startswith((".", "/")):
        models = load_diffusers_folder(_hub_snapshot(str(path)), dtype, device)
    else:
        raise UserError(f"{path}: file not found; give a .safetensors/.ckpt file, a diffusers folder or a hub id")
    if vae:
        models.vae = load_vae(vae, dtype, device)
    return models


def _hub_snapshot(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.txt", "unet/*.safetensors",
                                                               "vae/*.safetensors", "text_encoder*/*.safetensors"],
                                      ignore_patterns=["*.fp16.*"]))
    except Exception as exc:
        raise UserError(f"--pretrained_model_name_or_path: {repo_id} is not a local path and could not be fetched "
                        f"from the hub: {exc}")


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata of a safetensors file (raises a UserError for a broken file)."""
    return TensorFile(path).metadata


def dump_json(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, sort_keys=True)
