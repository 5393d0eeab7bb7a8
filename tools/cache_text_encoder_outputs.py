"""Cache the text-encoder outputs of a training dataset's captions (``<stem>_te_outputs.npz``).

    python tools/cache_text_encoder_outputs.py --pretrained_model_name_or_path MODEL --dataset_config data.toml [--sdxl]
    accelerate launch tools/cache_text_encoder_outputs.py ...   # several processes: each caches its own share

Same dataset options as the trainers. Captions must not change between steps (no shuffle_caption,
caption dropout, tag dropout or token warm-up): that is checked before any model is loaded. A
file is recomputed when its caption, the text encoders, ``--max_token_length`` or
``--weighted_captions`` changed. See docs/caching.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.errors import run_cli  # noqa: E402


def main(argv=None) -> None:
    """Cache the text-encoder outputs of this process's share of the dataset."""
    from tools.cache_latents import compute_dtype, prepare

    args, group, procs = prepare(argv, __doc__, "cache_text_encoder_outputs_to_disk")
    from library.data.cachers import TextEncoderCacheOptions, TextEncoderPairEncoder, module_fingerprint
    from library.models.checkpoint_io import load_sdxl  # heavy imports only after the checks
    from library.models.tokenizers import load_tokenizers

    args.no_half_vae = False  # the text encoders follow --mixed_precision
    dtype = compute_dtype(args, procs.device)
    models = load_sdxl(args.pretrained_model_name_or_path, None)  # weights as stored, for the fingerprint
    te_id = module_fingerprint(models.text_encoder1, models.text_encoder2)  # the id trainers compute
    te1, te2 = (m.to(procs.device, dtype).eval().requires_grad_(False)
                for m in (models.text_encoder1, models.text_encoder2))
    del models
    encoder = TextEncoderPairEncoder(load_tokenizers(args.tokenizer_cache_dir), (te1, te2),
                                     args.max_token_length, weighted=args.weighted_captions)
    options = TextEncoderCacheOptions(
        batch_size=args.text_encoder_batch_size or args.train_batch_size, to_disk=True,
        skip_cache_check=args.skip_cache_check, max_token_length=args.max_token_length,
        weighted_captions=args.weighted_captions, show_progress=True)
    report = group.cache_text_encoder_outputs(encoder, te_id, options,
                                              process_index=procs.index, num_processes=procs.count)
    print(f"[process {procs.index + 1}/{procs.count}] text-encoder outputs: {report.computed} "
          f"computed, {report.reused} reused", flush=True)
    procs.wait()


if __name__ == "__main__":
    run_cli(main)
