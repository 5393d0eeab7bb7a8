"""SDXL text-to-image generation over diffusers' schedulers, plus what the generator script attaches to it.

:class:`SDXLGenerator` holds the four models, the two tokenizers, the compute dtype and device,
and runs the denoising loop itself (no diffusers pipeline object) so that every piece is ours to
extend: A1111-weighted prompts of any length, per-image seeds that make an image independent of
the batch it was generated in, a negative-prompt scale, and *U-Net hooks* through which adapters
such as ControlNet-LLLite join the loop (see :class:`DenoiseStep`).

The algorithm is the one diffusers' ``StableDiffusionXLPipeline`` runs, so with the same inputs
both give the same image (tests/unit/test_pipeline.py checks this): initial noise
``N(0, 1) * scheduler.init_noise_sigma``, ``scale_model_input``, one batched U-Net call for
classifier-free guidance (negative first), ``scheduler.step`` (with the per-image generators
for ancestral samplers), VAE decode of ``latents / 0.13025``.

Also here: textual-inversion embeddings (:func:`load_textual_inversion`), LoRA-style networks
(:func:`load_networks`, :func:`set_network_multipliers`) and PNG output (:func:`save_image`).
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from PIL import Image

from library.errors import UserError
from library.text.weighting import count_windows, encode_weighted_prompt
from library.models.atomic import atomic_path
from library.models.sdxl import VAE_SCALE_FACTOR

logger = logging.getLogger(__name__)

Size = tuple[int, int]


@dataclass
class DenoiseStep:
    """What a U-Net hook sees before each U-Net call of the denoising loop.

    ``latent_input`` is the scaled model input as it goes into the U-Net: (k*B, 4, h, w) with
    k = 1 without guidance, 2 with (negative half first), 3 with a negative scale.
    """

    index: int  # 0-based U-Net call number (second-order samplers make two calls per step)
    num_calls: int  # U-Net calls in this run (len(scheduler.timesteps))
    timestep: torch.Tensor
    latent_input: torch.Tensor
    batch_size: int  # images being generated (B)
    guidance_copies: int  # k
    # False in a run where control adapters (ControlNet-LLLite ...) must stay off, e.g. the second
    # stage of the highres fix with --highres_fix_disable_control_net; hooks of such adapters honour it
    control_enabled: bool = True


UNetHook = Callable[[DenoiseStep], Optional[dict]]
"""A callable run before every U-Net call. It may change module state (e.g. ControlNet-LLLite
switching itself on for the first ``ratio`` of the calls, with its conditioning image already
embedded) and may return a dict of extra keyword arguments for the U-Net call (e.g.
``down_block_additional_residuals`` from a full ControlNet); ``None`` adds nothing."""

StepCallback = Callable[[int, torch.Tensor, torch.Tensor], None]
"""``callback(call_index, timestep, latents)`` after every scheduler step (progress, previews)."""


def seeded_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU ``torch.Generator`` per image, seeded with that image's seed."""
    return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]


def initial_noise(generators: Sequence[torch.Generator], channels: int, height: int, width: int) -> torch.Tensor:
    """Per-image N(0, 1) latents (B, channels, height/8, width/8) in fp32, drawn from each image's generator.

    Each image's noise depends only on its seed (never on the batch, device or dtype); it is the
    same draw diffusers makes for a list of CPU generators, and the generators go on to give the
    ancestral samplers' noise, as in diffusers.
    """
    draws = [torch.randn((1, channels, height // 8, width // 8), generator=g, dtype=torch.float32)
             for g in generators]
    return torch.cat(draws, dim=0)


def _place(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Move a model to ``device``/``dtype`` (casting only when needed) in eval mode without gradients."""
    current = next(module.parameters())
    if current.dtype != dtype or current.device != device:
        # plain nn.Module.to: diffusers' override only adds a warning about fp32-pinned modules (none here)
        torch.nn.Module.to(module, device=device, dtype=dtype)
    return module.eval().requires_grad_(False)


def _fresh_scheduler(sampler: Any, v_parameterization: bool, zero_terminal_snr: bool):
    """A scheduler for one run: built from a sampler name, or a fresh copy of a given scheduler."""
    if isinstance(sampler, str):
        from library.inference.samplers import make_sampler

        return make_sampler(sampler, v_parameterization, zero_terminal_snr)
    return type(sampler).from_config(sampler.config)


def _step_kwargs(scheduler, generators: list[torch.Generator]) -> dict[str, Any]:
    """Extra ``scheduler.step`` arguments: the per-image generators (ancestral/SDE samplers), eta 0."""
    params = inspect.signature(scheduler.step).parameters
    kwargs: dict[str, Any] = {}
    if "generator" in params:
        kwargs["generator"] = generators
    if "eta" in params:
        kwargs["eta"] = 0.0
    return kwargs


def _guide(pred: torch.Tensor, copies: int, scale: float, negative_scale: Optional[float]) -> torch.Tensor:
    """Combine the batched U-Net prediction: plain, CFG, or CFG with a separate negative scale."""
    if copies == 1:
        return pred
    if copies == 2:
        uncond, cond = pred.chunk(2)
        return uncond + scale * (cond - uncond)
    uncond, cond, negative = pred.chunk(3)
    return uncond + scale * (cond - uncond) - negative_scale * (negative - uncond)


class SDXLGenerator:
    """SDXL text-to-image generation with the models on one device in one compute dtype.

    ``dtype`` is the U-Net / text-encoder dtype. The VAE decodes in ``vae_dtype``; by default that
    is fp32 when ``dtype`` is fp16 (the SDXL VAE overflows in fp16 and gives black images) or
    ``no_half_vae`` is set, else ``dtype``. Latents and scheduler arithmetic stay fp32 whatever
    ``dtype`` is; only the U-Net input is cast.

    Attributes meant to be changed by callers:
      ``unet_hooks``: list of :data:`UNetHook` run before every U-Net call;
      ``token_replacements``: ``{trigger word: replacement}`` applied to prompts before
      tokenising (textual-inversion triggers expand to all their vectors' tokens);
      ``cuda_graphs``: replay the U-Net calls as CUDA graphs on a CUDA device (off by default: the
      caller must know that nothing outside the hooks changes the U-Net within a loop).
    """

    def __init__(self, unet, vae, text_encoders: Sequence[torch.nn.Module], tokenizers: Sequence,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 no_half_vae: bool = False, vae_dtype: Optional[torch.dtype] = None,
                 v_parameterization: bool = False, zero_terminal_snr: bool = False, channels_last: bool = False,
                 place_models: bool = True, cuda_graphs: bool = False):
        self.device = torch.device(device)
        self.dtype = dtype
        if vae_dtype is None:
            vae_dtype = torch.float32 if (no_half_vae or dtype == torch.float16) else dtype
        self.vae_dtype = vae_dtype
        # place_models=False (sampling inside a training run): use the modules exactly as they are,
        # never changing their device, dtype, train mode or requires_grad.
        place = _place if place_models else (lambda module, _device, _dtype: module)
        self.unet = place(unet, self.device, dtype)
        if channels_last:
            self.unet.to(memory_format=torch.channels_last)
        self.vae = place(vae, self.device, vae_dtype)
        self.text_encoders = [place(te, self.device, dtype) for te in text_encoders]
        self.tokenizers = list(tokenizers)
        self.v_parameterization = v_parameterization
        self.zero_terminal_snr = zero_terminal_snr
        self.unet_hooks: list[UNetHook] = []
        self.token_replacements: dict[str, str] = {}
        # replay the U-Net calls of each sampling loop as CUDA graphs (library/inference/unet_graphs.py)
        self.cuda_graphs = cuda_graphs

    @classmethod
    def from_models(cls, models, tokenizers: Sequence, **kwargs) -> "SDXLGenerator":
        """Build from an :class:`library.models.sdxl.SDXLModels` (``load_sdxl``'s result)."""
        return cls(models.unet, models.vae, [models.text_encoder1, models.text_encoder2], tokenizers, **kwargs)

    # ---- text conditioning ------------------------------------------------------------------
    def expand_tokens(self, prompt: str) -> str:
        """Apply :attr:`token_replacements` to whole words of ``prompt`` (case-insensitive)."""
        for word, replacement in self.token_replacements.items():
            prompt = re.sub(rf"(?<![\w]){re.escape(word)}(?![\w])", lambda _m: replacement, prompt,
                            flags=re.IGNORECASE)
        return prompt

    def encode_prompts(self, prompts: Sequence[str], max_embeddings_multiples: int = 3,
                       also_fit: Sequence[str] = ()) -> tuple[torch.Tensor, torch.Tensor]:
        """Weighted encoding of ``prompts``: (context (B, T, 2048), pooled (B, 1280)) in the U-Net dtype.

        T = 2 + 75 n, with n the fewest windows (at most ``max_embeddings_multiples``) that hold the
        longest of ``prompts`` and ``also_fit`` (so a batch and its negatives share one length).
        """
        prompts = [self.expand_tokens(p) for p in prompts]
        others = [self.expand_tokens(p) for p in also_fit]
        windows = max(count_windows(tok, list(prompts) + others, max_embeddings_multiples) for tok in self.tokenizers)
        context, pooled = encode_weighted_prompt(self.tokenizers, self.text_encoders, prompts, 75 * windows)
        return context.to(self.dtype), pooled.to(self.dtype)

    def _encode_or_zero(self, prompts: Sequence[str], like: tuple[torch.Tensor, torch.Tensor],
                        multiples: int, fit: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode prompts; empty ones give zero context and pooled (SDXL's empty-negative convention)."""
        context = torch.zeros_like(like[0])
        pooled = torch.zeros_like(like[1])
        used = [i for i, p in enumerate(prompts) if p.strip()]
        if used:
            c, p = self.encode_prompts([prompts[i] for i in used], multiples, also_fit=fit)
            if c.shape[1] != context.shape[1]:  # cannot happen when ``fit`` covers both sides; be safe
                raise RuntimeError("negative and positive prompt lengths differ")
            context[used], pooled[used] = c, p
        return context, pooled

    def conditioning(self, prompts: Sequence[str], negative_prompts: Sequence[str], copies: int,
                     max_embeddings_multiples: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Context and pooled for the batched U-Net call: [negative, positive(, empty)] along the batch."""
        everything = list(prompts) + [p for p in negative_prompts if p.strip()]
        positive = self.encode_prompts(prompts, max_embeddings_multiples, also_fit=everything)
        if copies == 1:
            return positive
        negative = self._encode_or_zero(negative_prompts, positive, max_embeddings_multiples, everything)
        if copies == 2:
            parts = [negative, positive]
        else:  # negative scale: [empty (zeros), positive, negative prompt]
            parts = [(torch.zeros_like(positive[0]), torch.zeros_like(positive[1])), positive, negative]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    # ---- generation -------------------------------------------------------------------------
    def generate(self, prompts: Sequence[str], negative_prompts: Optional[Sequence[str]] = None,
                 width: int = 1024, height: int = 1024, steps: int = 50, guidance_scale: float = 7.5,
                 sampler: Any = "ddim", seeds: Optional[Sequence[int]] = None,
                 original_size: Optional[Size] = None, crop_top_left: Size = (0, 0),
                 target_size: Optional[Size] = None, negative_original_size: Optional[Size] = None,
                 max_embeddings_multiples: int = 3, latents: Optional[torch.Tensor] = None,
                 callback: Optional[StepCallback] = None, negative_scale: Optional[float] = None,
                 output_type: str = "pil", vae_batch_size: Optional[int] = None, init: Any = None,
                 gradual_latent: Any = None, control_enabled: bool = True) -> Any:
        """Generate one image per prompt.

        ``seeds`` gives one seed per image (default 0, 1, ...): each image's initial noise and the
        noise of ancestral samplers come from its own CPU generator, so a seed gives the same
        image in any batch. ``latents`` replaces the initial noise (unscaled N(0, 1), (B, 4, H/8, W/8)).
        Sizes are (height, width) and (top, left) as SDXL conditions on them; ``original_size`` and
        ``target_size`` default to (height, width), the negative original size to the positive one.
        Guidance runs when ``guidance_scale > 1``; an empty negative prompt gives zero conditioning.
        ``negative_scale`` (sd-scripts' ``--negative_scale``) adds a third, empty-prompt batch:
        ``uncond + scale * (cond - uncond) - negative_scale * (negative - uncond)``.
        ``sampler`` is a name from :data:`library.inference.samplers.SAMPLER_NAMES` or a diffusers
        scheduler (copied, never mutated). ``output_type``: ``"pil"`` (list of images), ``"np"``
        (float array (B, H, W, 3) in [0, 1]) or ``"latent"`` (final latents, unscaled by the VAE factor);
        ``vae_batch_size`` limits how many images the VAE decodes at once.

        ``init`` (a :class:`library.inference.img2img.InitImage`) makes it img2img / inpainting: the
        size comes from the init image, its strength sets how many of the ``steps`` run (see that
        module). ``gradual_latent`` (:class:`library.inference.gradual_latent.GradualLatentSettings`)
        grows the latent over the steps. ``control_enabled=False`` reaches the U-Net hooks as
        :attr:`DenoiseStep.control_enabled` (adapters stay off in this run).
        """
        b = len(prompts)
        negative_prompts = list(negative_prompts) if negative_prompts is not None else [""] * b
        seeds = list(seeds) if seeds is not None else list(range(b))
        if init is not None:
            width, height = init.size()
        self._check(b, negative_prompts, seeds, width, height, steps, latents, output_type)
        copies = 1 if guidance_scale <= 1.0 else (3 if negative_scale is not None else 2)
        with torch.no_grad():
            context, pooled = self.conditioning(prompts, negative_prompts, copies, max_embeddings_multiples)
            added = self._added_cond(pooled, b, copies, height, width, original_size, crop_top_left, target_size,
                                     negative_original_size)
            generators = seeded_generators(seeds)
            if latents is None and init is None:
                latents = initial_noise(generators, self.unet.config.in_channels, height, width)
            final = self._denoise(None if latents is None else latents.float(), context, added, sampler, steps,
                                  generators, (guidance_scale, negative_scale, copies), callback,
                                  (init, gradual_latent, control_enabled))
            if output_type == "latent":
                return final
            return self.decode(final, output_type, vae_batch_size)

    def _check(self, b, negatives, seeds, width, height, steps, latents, output_type) -> None:
        if b == 0:
            raise ValueError("no prompts")
        if len(negatives) != b or len(seeds) != b:
            raise ValueError(f"{b} prompts need {b} negative prompts and {b} seeds "
                             f"(got {len(negatives)} and {len(seeds)})")
        if width % 8 or height % 8 or width < 8 or height < 8:
            raise UserError(f"image size {width}x{height}: width and height must be positive multiples of 8")
        if steps < 1:
            raise UserError(f"steps must be at least 1 (got {steps})")
        if latents is not None and tuple(latents.shape) != (b, self.unet.config.in_channels, height // 8, width // 8):
            raise ValueError(f"latents of shape {tuple(latents.shape)} do not fit {b} images of {width}x{height}")
        if output_type not in ("pil", "np", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'latent' (got {output_type!r})")

    def _added_cond(self, pooled, b, copies, height, width, original_size, crop_top_left, target_size,
                    negative_original_size) -> dict[str, torch.Tensor]:
        """The U-Net's ``added_cond_kwargs``: pooled text and the six size numbers per batch row."""
        original = tuple(original_size or (height, width))
        target = tuple(target_size or (height, width))
        positive = list(original) + list(crop_top_left) + list(target)
        negative = list(negative_original_size or original) + list(crop_top_left) + list(target)
        # batch order [negative, positive] or, with a negative scale, [empty, positive, negative]
        rows = {1: [positive], 2: [negative, positive], 3: [negative, positive, negative]}[copies]
        # fp32 even for a half-precision U-Net: sizes such as 1023 are not exact in bf16, and the U-Net
        # embeds them in fp32 anyway
        ids = torch.tensor(rows, dtype=torch.float32, device=self.device).repeat_interleave(b, dim=0)
        return {"text_embeds": pooled.to(self.device), "time_ids": ids}

    def _denoise(self, noise, context, added, sampler, steps, generators, guidance, callback,
                 extras=(None, None, True)) -> torch.Tensor:
        """The sampling loop; returns fp32 latents in the U-Net's latent space."""
        scale, negative_scale, copies = guidance
        init, gradual_settings, control_enabled = extras
        scheduler = _fresh_scheduler(sampler, self.v_parameterization, self.zero_terminal_snr)
        scheduler.set_timesteps(steps, device=self.device)
        start, blend = 0, None
        if init is not None:  # img2img / inpainting: see library/inference/img2img.py
            from library.inference import img2img

            latents, start, blend = img2img.prepare(init, self.vae, self.vae_dtype, scheduler, steps, generators,
                                                    self.device)
        else:
            if hasattr(scheduler, "set_begin_index"):
                scheduler.set_begin_index(0)
            latents = noise.to(self.device) * scheduler.init_noise_sigma
        gradual = None
        if gradual_settings is not None:
            from library.inference.gradual_latent import GradualLatent

            gradual = GradualLatent(gradual_settings, tuple(latents.shape[-2:]))
            latents = gradual.begin(latents)
        step_kwargs = _step_kwargs(scheduler, generators)
        context = context.to(self.device)
        timesteps = scheduler.timesteps[start:]
        graphs = self._loop_graphs()
        for i, t in enumerate(timesteps):
            model_input = scheduler.scale_model_input(latents, t)
            model_input = torch.cat([model_input] * copies) if copies > 1 else model_input
            extra: dict[str, Any] = {}
            for hook in self.unet_hooks:
                extra.update(hook(DenoiseStep(i, len(timesteps), t, model_input, latents.shape[0], copies,
                                              control_enabled)) or {})
            pred = self._unet_call(graphs, model_input.to(self.dtype), t, context, added, extra).float()
            pred = _guide(pred, copies, scale, negative_scale)
            if gradual is not None:
                latents = gradual.step(scheduler, pred, t, latents, generators)
            else:
                latents = scheduler.step(pred, t, latents, **step_kwargs, return_dict=False)[0]
            if blend is not None:
                latents = blend(latents, i)
            if callback is not None:
                callback(i, t, latents)
        return gradual.finish(latents) if gradual is not None else latents

    def _loop_graphs(self):
        """A :class:`~library.inference.unet_graphs.LoopGraphs` for one sampling loop, or None (eager)."""
        if not self.cuda_graphs or self.device.type != "cuda":
            return None
        from library.inference.unet_graphs import LoopGraphs

        unet = self.unet

        def call(x: dict[str, torch.Tensor]) -> torch.Tensor:
            added = {"text_embeds": x["text_embeds"], "time_ids": x["time_ids"]}
            return unet(x["sample"], x["timestep"], encoder_hidden_states=x["context"], added_cond_kwargs=added,
                        return_dict=False)[0]
        return LoopGraphs(call)

    def _unet_call(self, graphs, sample, t, context, added, extra) -> torch.Tensor:
        """One U-Net prediction: replayed from a CUDA graph when ``graphs`` and the hooks allow it."""
        if graphs is not None and not extra:
            from library.inference.unet_graphs import hooks_key

            state = hooks_key(self.unet_hooks)
            if state is not None:
                inputs = {"sample": sample, "timestep": torch.as_tensor(t, device=self.device), "context": context,
                          "text_embeds": added["text_embeds"], "time_ids": added["time_ids"]}
                return graphs(inputs, state)
        return self.unet(sample, t, encoder_hidden_states=context, added_cond_kwargs=added, return_dict=False,
                         **extra)[0]

    def decode(self, latents: torch.Tensor, output_type: str = "pil", vae_batch_size: Optional[int] = None) -> Any:
        """VAE-decode latents (``latents / 0.13025``) in the VAE dtype: PIL images or an (B, H, W, 3) array."""
        chunk = vae_batch_size or latents.shape[0]
        pieces = []
        with torch.no_grad():
            for start in range(0, latents.shape[0], chunk):
                part = (latents[start:start + chunk] / VAE_SCALE_FACTOR).to(self.device, self.vae_dtype)
                pieces.append(self.vae.decode(part, return_dict=False)[0].float())
        images = (torch.cat(pieces) / 2 + 0.5).clamp(0, 1)
        if torch.isnan(images).any():
            logger.warning("the decoded image contains NaN (VAE overflow in %s); use --no_half_vae", self.vae_dtype)
        if output_type == "np":
            return images.permute(0, 2, 3, 1).cpu().numpy()
        # 8-bit on the device (the same fp32 arithmetic numpy would do): a quarter of the bytes to copy
        pixels = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(img) for img in pixels]


# ---- textual inversion ----------------------------------------------------------------------------
def _read_embedding_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise UserError(f"--textual_inversion_embeddings: {path} not found")
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"--textual_inversion_embeddings: cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"--textual_inversion_embeddings: {path} does not hold a dict of tensors")
    return data


def load_textual_inversion(path: str | os.PathLike, tokenizers: Sequence, text_encoders: Sequence[torch.nn.Module]
                           ) -> tuple[str, list[str]]:
    """Add an SDXL embedding file ({"clip_l": [n, 768], "clip_g": [n, 1280]}) to both encoders.

    The trigger word is the file stem; n vectors become the tokens ``stem, stem1, ..., stem{n-1}``,
    added to both tokenizers, with both embedding tables grown to hold them. Returns
    ``(trigger, tokens)``; put ``{trigger: " ".join(tokens)}`` into
    :attr:`SDXLGenerator.token_replacements` so prompts may simply say the stem.
    """
    path = Path(path)
    data = _read_embedding_file(path)
    vectors = [data.get("clip_l"), data.get("clip_g")]
    if vectors[0] is None or vectors[1] is None:
        raise UserError(f"--textual_inversion_embeddings: {path} must hold 'clip_l' and 'clip_g' tensors "
                        f"(SDXL format); found keys {sorted(data)}")
    count = vectors[0].shape[0] if vectors[0].dim() == 2 else 1
    stem = path.stem
    tokens = [stem] + [f"{stem}{i}" for i in range(1, count)]
    for tok, te, vec, name in zip(tokenizers, text_encoders, vectors, ("clip_l", "clip_g")):
        vec = vec.reshape(-1, vec.shape[-1])
        emb = te.get_input_embeddings()
        if vec.shape != (count, emb.weight.shape[1]):
            raise UserError(f"--textual_inversion_embeddings: {path}: '{name}' has shape {tuple(vec.shape)}, "
                            f"this model needs ({count}, {emb.weight.shape[1]})")
        if tok.add_tokens(tokens) != count:
            raise UserError(f"--textual_inversion_embeddings: {path}: the token {stem!r} (or one of {tokens}) is "
                            "already in the vocabulary; rename the file")
        te.resize_token_embeddings(len(tok))
        ids = tok.convert_tokens_to_ids(tokens)
        emb = te.get_input_embeddings()
        with torch.no_grad():
            emb.weight[ids] = vec.to(device=emb.weight.device, dtype=emb.weight.dtype)
    logger.info("textual inversion %s: %d vector(s), trigger %r", path.name, count, stem)
    return stem, tokens


# ---- LoRA-style networks -----------------------------------------------------------------------------
def _import_network_module(name: str):
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise UserError(f"--network_module: cannot import {name!r}: {exc}") from None


def parse_network_args(args: Optional[Sequence[str]]) -> dict[str, str]:
    """``["conv_dim=4", "k=v"]`` -> ``{"conv_dim": "4", "k": "v"}`` (sd-scripts' ``--network_args``)."""
    result = {}
    for item in args or []:
        if "=" not in item:
            raise UserError(f"--network_args: {item!r} is not key=value")
        key, value = item.split("=", 1)
        result[key.strip()] = value.strip()
    return result


def load_networks(modules: Sequence[str], files: Sequence[str], multipliers: Sequence[float], unet, vae,
                  text_encoders: Sequence[torch.nn.Module], dtype: torch.dtype, device: torch.device | str,
                  merge: bool = False, merge_count: Optional[int] = None,
                  network_args: Optional[Sequence[dict]] = None) -> list:
    """Load LoRA-style network files onto the models; return the networks that stay attached.

    ``modules[i]`` is the Python module of file i (one name is used for every file). Merged networks
    (``merge``, or the first ``merge_count`` files) are baked into the weights and not returned;
    the rest are applied as hooks whose multiplier :func:`set_network_multipliers` can change per
    prompt. ``multipliers`` pads with 1.0.
    """
    attached = []
    for i, file in enumerate(files):
        module = _import_network_module(modules[min(i, len(modules) - 1)] if modules else "networks.lora")
        if not Path(file).is_file():
            raise UserError(f"--network_weights: {file} not found")
        mult = float(multipliers[i]) if i < len(multipliers) else 1.0
        kwargs = (network_args[min(i, len(network_args) - 1)] if network_args else {}) or {}
        try:
            result = module.create_network_from_weights(mult, file, vae, list(text_encoders), unet,
                                                        for_inference=True, **kwargs)
        except UserError:
            raise
        except Exception as exc:
            raise UserError(f"--network_weights: cannot load {file}: {exc}") from None
        network, weights = result if isinstance(result, tuple) else (result, None)
        if weights is None:
            from safetensors.torch import load_file

            weights = load_file(file) if str(file).endswith(".safetensors") else torch.load(
                file, map_location="cpu", weights_only=True)
        if merge or (merge_count is not None and i < merge_count):
            network.merge_to(list(text_encoders), unet, weights, dtype, device)
            logger.info("merged network %s (multiplier %g)", file, mult)
            continue
        network.apply_to(list(text_encoders), unet, True, True)
        if hasattr(network, "load_lora_state_dict"):
            network.load_lora_state_dict(weights, source=str(file))
        else:
            network.load_state_dict(weights, strict=False)
        network.to(device=device, dtype=dtype)
        network.eval().requires_grad_(False)
        attached.append(network)
        logger.info("applied network %s (multiplier %g)", file, mult)
    return attached


def set_network_multipliers(networks: Sequence, multipliers: Optional[Sequence[float]], skip: int = 0) -> None:
    """Set each attached network's multiplier from a per-file list; the last value repeats.

    ``skip`` is the number of files merged before the attached ones (``--network_merge_n_models``),
    whose values are passed over. ``None`` or an empty list changes nothing.
    """
    if not multipliers:
        return
    values = list(multipliers[skip:]) or [multipliers[-1]]
    for i, network in enumerate(networks):
        network.set_multiplier(float(values[min(i, len(values) - 1)]))


# ---- output --------------------------------------------------------------------------------------------
def save_image(image: Image.Image, path: str | os.PathLike, params: dict) -> Path:
    """Write ``image`` as PNG with the generation parameters as text chunks, atomically."""
    from library.inference.png_metadata import generation_pnginfo

    path = Path(path)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=generation_pnginfo(params))
    return path


def unique_path(path: Path) -> Path:
    """``path``, or ``stem_1.png``, ``stem_2.png`` ... when it exists (outputs are never overwritten)."""
    candidate, n = path, 0
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.stem}_{n}{path.suffix}")
    return candidate


def next_sequence_number(outdir: Path, prefix: str = "") -> int:
    """1 + the highest NNNNNN of ``im_{prefix}NNNNNN.png`` in ``outdir`` (1 for an empty or new folder)."""
    numbers = [int(m.group(1)) for p in (outdir.glob("im_*.png") if outdir.is_dir() else [])
               if (m := re.fullmatch(rf"im_{re.escape(prefix)}(\d{{6,}})\.png", p.name))]
    return max(numbers, default=0) + 1


def output_name(index: int, seed: int, timestamp: str, sequence: Optional[int] = None, prefix: str = "") -> str:
    """sd-scripts' file names: ``im_{YYYYmmddHHMMSS}_{prefix}{index:03d}_{seed}.png`` or ``im_{prefix}{n:06d}.png``.

    ``prefix`` is sd-scripts' highres-fix stage mark: ``"0"`` for a saved first stage, ``"1"`` for
    the final image of a highres-fix run, empty otherwise.
    """
    if sequence is not None:
        return f"im_{prefix}{sequence:06d}.png"
    return f"im_{timestamp}_{prefix}{index:03d}_{seed}.png"
