"""Textual inversion (``sdxl_train_textual_inversion.py``): learn new token vectors in both text encoders.

The token string ``tok`` with ``--num_vectors_per_token N`` becomes the tokens ``tok, tok1, ...,
tok{N-1}``, added to both tokenizers; both token-embedding tables grow by N rows. The trained
values are two separate float32 parameters, ``clip_l`` [N, C1] and ``clip_g`` [N, C2]; a forward
hook on each embedding table writes them into the lookup output wherever a new id occurs. So the
frozen tables (and everything else: both encoders, U-Net, VAE, stored in the compute dtype) never
receive a gradient, and every other row stays bit-identical under any precision or optimizer,
including 8-bit ones, with no per-step restore.

Captions: every training caption must contain the token string, which is replaced by the N tokens;
or, with ``--use_object_template`` / ``--use_style_template``, captions are ignored and each sample
gets a template ("a photo of a {}") filled with the N tokens, chosen from (seed, epoch, step, index)
so that ``--resume`` continues exactly.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from library.errors import UserError
from library.models.checkpoint_io import save_dtype
from library.models.embedding_file import read_embedding, write_embedding
from library.models.metadata import modelspec_metadata, tensor_payload_hashes
from library.training.distributed import batch_index
from library.training.methods import common_metadata
from library.training.trainer import TrainingRun

logger = logging.getLogger(__name__)

# Prompt templates in the style of the ImageNet prompts of CLIP / the textual-inversion paper.
OBJECT_TEMPLATES = (
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
    "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}", "a cropped photo of a {}",
    "a photo of the {}", "a good photo of the {}", "a photo of one {}", "a close-up photo of the {}",
    "a rendition of the {}", "a photo of the clean {}", "a rendition of a {}", "a photo of a nice {}",
    "a good photo of a {}", "a photo of the nice {}", "a photo of the small {}", "a photo of the weird {}",
    "a photo of the large {}", "a photo of a cool {}", "a photo of a small {}",
)
STYLE_TEMPLATES = (
    "a painting in the style of {}", "a rendering in the style of {}", "a cropped painting in the style of {}",
    "the painting in the style of {}", "a clean painting in the style of {}", "a dirty painting in the style of {}",
    "a dark painting in the style of {}", "a picture in the style of {}", "a cool painting in the style of {}",
    "a close-up painting in the style of {}", "a bright painting in the style of {}",
    "a good painting in the style of {}", "a close-up picture in the style of {}",
    "a rendition in the style of {}", "a nice painting in the style of {}", "a small painting in the style of {}",
    "a weird painting in the style of {}", "a large painting in the style of {}",
)
MAX_LISTED = 10


@dataclass
class TextualInversionOptions:
    """sdxl_train_textual_inversion.py's own options as plain values."""

    token_string: str = ""
    init_word: str | None = None
    num_vectors_per_token: int = 1
    weights: str | None = None
    use_object_template: bool = False
    use_style_template: bool = False

    @classmethod
    def from_namespace(cls, ns: Any) -> TextualInversionOptions:
        names = cls.__dataclass_fields__.keys()
        return cls(**{n: getattr(ns, n) for n in names if getattr(ns, n, None) is not None})

    @property
    def templates(self) -> Sequence[str] | None:
        """The template list of the chosen template mode, or None in caption mode."""
        if self.use_object_template:
            return OBJECT_TEMPLATES
        return STYLE_TEMPLATES if self.use_style_template else None


def token_names(token_string: str, count: int) -> list[str]:
    """``tok, tok1, ..., tok{count-1}``: the tokens of one embedding (as A1111/ComfyUI name them)."""
    return [token_string] + [f"{token_string}{i}" for i in range(1, count)]


def check_new_tokens(tokenizers: Sequence, tokens: Sequence[str]) -> None:
    """UserError unless none of ``tokens`` is already in a tokenizer's vocabulary."""
    for tok in tokenizers:
        vocab = tok.get_vocab()
        taken = [t for t in tokens if t in vocab]
        if taken:
            raise UserError(f"--token_string: {', '.join(repr(t) for t in taken)} is already in the tokenizer "
                            "vocabulary; choose a new, unusual string (e.g. 'sksxyz')")


def check_captions(data, token_string: str) -> None:
    """UserError listing the training images (up to 10, and a count) whose caption lacks ``token_string``.

    The caption is the one the image is trained with: caption file (or folder class tokens) plus the
    subset's ``caption_prefix`` / ``caption_suffix``. Regularisation images are not checked.
    """
    missing = []
    for item in data.items:
        if item.is_reg:
            continue
        sub = data.configs[item.dataset_index].subsets[item.subset_index]
        text = f"{getattr(sub, 'caption_prefix', None) or ''}{item.caption or ''}{getattr(sub, 'caption_suffix', None) or ''}"
        if token_string not in text:
            missing.append(item.path)
    if missing:
        shown = ", ".join(missing[:MAX_LISTED])
        more = f" and {len(missing) - MAX_LISTED} more" if len(missing) > MAX_LISTED else ""
        raise UserError(f"--token_string {token_string!r} is missing from the caption of {len(missing)} training "
                        f"image(s): {shown}{more}; add it to those captions, or use --use_object_template / "
                        "--use_style_template")


class TokenVectors(torch.nn.Module):
    """The trained values: ``clip_l`` [N, C1] and ``clip_g`` [N, C2] (float32 parameters)."""

    def __init__(self, clip_l: torch.Tensor, clip_g: torch.Tensor):
        super().__init__()
        self.clip_l = torch.nn.Parameter(clip_l.float().clone())
        self.clip_g = torch.nn.Parameter(clip_g.float().clone())


def override_hook(first_id: int, vectors: torch.nn.Parameter) -> Callable:
    """A forward hook for a token-embedding table: rows of ids ``first_id ..`` come from ``vectors``.

    No host sync: the override is a ``torch.where`` over the whole lookup.
    """
    last = vectors.shape[0] - 1

    def hook(module, args, output):
        ids = args[0]
        is_new = (ids >= first_id).unsqueeze(-1)  # (B, T, 1)
        picked = vectors[(ids - first_id).clamp(0, last)].to(output.dtype)  # (B, T, C)
        return torch.where(is_new, picked, output)
    return hook


def initial_vectors(tokenizer, table: torch.Tensor, count: int, init_word: str | None) -> torch.Tensor:
    """Start values [count, C]: the init word's token rows repeated cyclically, else the mean row."""
    if not init_word:
        return table.float().mean(dim=0, keepdim=True).repeat(count, 1)
    ids = tokenizer.encode(init_word, add_special_tokens=False)
    if not ids:
        raise UserError(f"--init_word {init_word!r} has no tokens")
    if len(ids) > count:
        logger.warning("--init_word %r is %d tokens; only the first %d seed the %d vector(s)", init_word, len(ids),
                       count, count)
    return torch.stack([table[ids[i % len(ids)]].float() for i in range(count)])


class TextualInversionMethod:
    """Trains only the new token vectors of both text encoders; saves them as an embedding file."""

    kind = "textual-inversion"
    trains_text_encoders = True  # gradients flow through the (frozen) encoders to the vectors
    unet_weights_trained = False
    text_encoder_weights_trained = False

    def __init__(self, opts: TextualInversionOptions, tokenizers: Sequence):
        """Checks that need no model (run before loading): token string, vector count, ``--weights``."""
        self.opts = opts
        token = opts.token_string
        if not token or any(c.isspace() for c in token):
            raise UserError(f"--token_string {token!r}: give one word without spaces")
        if opts.num_vectors_per_token < 1:
            raise UserError(f"--num_vectors_per_token must be at least 1, got {opts.num_vectors_per_token}")
        self.tokens = token_names(token, opts.num_vectors_per_token)
        check_new_tokens(tokenizers, self.tokens)
        self.start = None
        if opts.weights:
            self.start = read_embedding(opts.weights, "--weights")
            if self.start[0].shape[0] != opts.num_vectors_per_token:
                raise UserError(f"--weights {opts.weights} holds {self.start[0].shape[0]} vector(s) but "
                                f"--num_vectors_per_token is {opts.num_vectors_per_token}; make them match")
        self.vectors: TokenVectors | None = None
        self.prepared = None
        self.hooks: list = []

    def check_data(self, data) -> None:
        """Caption mode: every training caption contains the token string (after the scan, before loading)."""
        if self.opts.templates is None:
            check_captions(data, self.opts.token_string)

    # ---- setup --------------------------------------------------------------------------------
    def setup(self, run: TrainingRun) -> None:
        models, cfg = run.models, run.cfg
        self.run = run
        for module in (models.unet, models.vae, models.text_encoder1, models.text_encoder2):
            module.requires_grad_(False)
        tokenizers = (run.conditioner.tokenizer1, run.conditioner.tokenizer2)
        encoders = (models.text_encoder1, models.text_encoder2)
        starts = [self._start(tok, te, i) for i, (tok, te) in enumerate(zip(tokenizers, encoders))]
        self.vectors = TokenVectors(*starts).to(run.device)
        for tok, te, vec in zip(tokenizers, encoders, (self.vectors.clip_l, self.vectors.clip_g)):
            self.hooks.append(self._add_tokens(tok, te, vec))
        if cfg.gradient_checkpointing:
            # The U-Net only: the text encoders' activations are small (~0.2 GB per image at 77 tokens
            # for both), and recomputing their ~60 layers would add host-bound launches to every step.
            models.unet.enable_gradient_checkpointing()
        replacement = " ".join(self.tokens)
        base_encode = run.encode_text
        run.encode_text = lambda captions: base_encode(self.training_captions(captions))
        if len(self.tokens) > 1:
            run.prompt_replacements[self.opts.token_string] = replacement
        logger.info("textual inversion: tokens %s, %d vector(s) of widths %d and %d", replacement, len(self.tokens),
                    starts[0].shape[1], starts[1].shape[1])

    def _start(self, tokenizer, te: torch.nn.Module, index: int) -> torch.Tensor:
        table = te.get_input_embeddings().weight
        if self.start is not None:
            start = self.start[index]
            if start.shape[1] != table.shape[1]:
                name = ("clip_l", "clip_g")[index]
                raise UserError(f"--weights {self.opts.weights}: '{name}' is {start.shape[1]} wide but this model's "
                                f"text encoder {index + 1} needs {table.shape[1]}")
            return start
        with torch.no_grad():
            return initial_vectors(tokenizer, table, len(self.tokens), self.opts.init_word)

    def _add_tokens(self, tokenizer, te: torch.nn.Module, vectors: torch.nn.Parameter):
        """Add the tokens, grow the table by N rows (set to the start values) and hook the lookup."""
        if tokenizer.add_tokens(self.tokens) != len(self.tokens):
            raise UserError(f"--token_string: one of {self.tokens} is already in the tokenizer vocabulary")
        ids = tokenizer.convert_tokens_to_ids(self.tokens)
        if ids != list(range(ids[0], ids[0] + len(ids))):
            raise UserError(f"--token_string: the new tokens got non-consecutive ids {ids}")
        te.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        table = te.get_input_embeddings()
        table.requires_grad_(False)
        with torch.no_grad():
            table.weight[ids[0]:] = vectors.detach().to(table.weight.dtype)
        return table.register_forward_hook(override_hook(ids[0], vectors))

    def training_captions(self, captions: Sequence[str]) -> list[str]:
        """Captions as the encoders see them: token string expanded, or templates in template mode."""
        replacement = " ".join(self.tokens)
        templates = self.opts.templates
        if templates is None:
            return [c.replace(self.opts.token_string, replacement) for c in captions]
        p, seed, acc = self.run.progress, self.run.cfg.seed or 0, self.run.accelerator
        # keyed by the batch's place in the epoch's order (not the process's own count), so N processes
        # pick the templates one process picks for the same batches
        where = batch_index(p.step_in_epoch, acc.process_index, acc.num_processes) if p else 0
        key = f"ti-template:{seed}:{p.epoch if p else 0}:{where}"
        return [random.Random(f"{key}:{i}").choice(templates).format(replacement) for i in range(len(captions))]

    # ---- text encoding inside the trainer's CUDA graph --------------------------------------------
    @property
    def graph_text_encoding(self) -> bool:
        """With CUDA graphs, the trainer replays both encoders with the U-Net (from token ids): their
        ~60 layers forward and backward are otherwise thousands of small launches per step. Not with
        --weighted_captions, whose encoding reads the weights on the host."""
        return not self.run.cfg.weighted_captions

    def caption_ids(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Windowed token ids of the training captions (templates / token expansion applied)."""
        return self.run.conditioner.tokenize(self.training_captions(captions))

    def encode_caption_ids(self, ids1: torch.Tensor, ids2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(context, pooled) of :meth:`caption_ids`, the new rows taken from the trained vectors."""
        return self.run.conditioner.context_of(ids1, ids2)

    # ---- the loop's protocol --------------------------------------------------------------------
    def param_groups(self) -> list[dict]:
        return [{"params": [self.vectors.clip_l, self.vectors.clip_g], "lr": self.run.cfg.learning_rate}]

    def trained_modules(self) -> list[torch.nn.Module]:
        return [self.vectors]

    def set_prepared(self, modules: list[torch.nn.Module]) -> None:
        self.prepared = modules[0]

    def unet_forward(self, run, noisy, timesteps, context, added, batch) -> torch.Tensor:
        return run.models.unet(noisy, timesteps, context, added_cond_kwargs=added).sample

    def after_optimizer_step(self, run: TrainingRun) -> None:
        """Nothing to restore: the frozen tables never receive a gradient."""

    def trained_vectors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The current ``(clip_l, clip_g)`` (float32, detached)."""
        module = self.run.accelerator.unwrap_model(self.prepared) if self.prepared is not None else self.vectors
        return module.clip_l.detach(), module.clip_g.detach()

    def metadata(self, run: TrainingRun, epoch: int, step: int) -> dict[str, str]:
        opts = self.opts
        """``ss_*`` and ``modelspec.*`` keys (only modelspec and the TI keys with ``--no_metadata``)."""
        if run.cfg.no_metadata:
            meta = modelspec_metadata(title=run.cfg.output_name or "embedding", kind=self.kind)
        else:
            meta = common_metadata(run, self.kind, epoch, step)
        meta.update({"ss_token_string": opts.token_string, "ss_num_vectors_per_token": str(len(self.tokens)),
                     "ss_init_word": opts.init_word or "", "ss_weights": Path(opts.weights).name if opts.weights else "",
                     "ss_use_template": "object" if opts.use_object_template else
                     ("style" if opts.use_style_template else "")})
        return meta

    def save(self, run: TrainingRun, stem: str, epoch: int, step: int) -> Path:
        fmt = run.cfg.save_model_as or "pt"
        path = Path(run.cfg.output_dir) / f"{stem}.{fmt}"
        dtype = save_dtype(run.cfg.save_precision) or torch.float32
        clip_l, clip_g = self.trained_vectors()
        meta = None
        if fmt == "safetensors":
            meta = self.metadata(run, epoch, step)
            state = {"clip_l": clip_l.to("cpu", dtype).contiguous(), "clip_g": clip_g.to("cpu", dtype).contiguous()}
            meta.update(tensor_payload_hashes(state, meta))
        return write_embedding(path, clip_l, clip_g, dtype, meta)
