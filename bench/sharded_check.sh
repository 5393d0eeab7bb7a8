#!/usr/bin/env bash
# FSDP2 and DeepSpeed ZeRO-2/3 on one GPU with the tiny model: a few steps of sdxl_train.py each, then the
# saved checkpoint loaded in diffusers.  One PASS/FAIL line per case.
#   bash bench/sharded_check.sh .speedtree/whl_sharded        (from the repo root; no network needed)
# Without CUDA every case FAILs: FSDP because accelerate applies it only to GPU processes, and the
# script says so first.
set -uo pipefail
WHL="${1:?usage: bench/sharded_check.sh WHEEL_FOLDER}"
OUT="${OUT:-/tmp/sharded_check}"; mkdir -p "$OUT"; T="$OUT/site"
PY="${PYTHON:-python3}"
NAMES=$(ls "$WHL" | sed 's/-[0-9].*//' | sort -u)  # one wheel per package: pip picks this Python's build
# shellcheck disable=SC2086
"$PY" -m pip install -q --no-index --no-deps --find-links "$WHL" --target "$T" $NAMES 2>&1 | tail -3
export PYTHONPATH="$PWD:$T:${PYTHONPATH:-}" HF_HUB_OFFLINE=1 OMP_NUM_THREADS=4
"$PY" -c "import torch; print('cuda', torch.cuda.is_available())" | grep -q "cuda True" || echo "note: no CUDA here: FSDP and ZeRO need GPUs; expect FAIL"
"$PY" tools/make_tiny_sdxl.py "$OUT/tiny" --seed 0 --images 8 > "$OUT/make.log" 2>&1 || { echo "FAIL tiny model (see $OUT/make.log)"; exit 1; }
ARGS=(--pretrained_model_name_or_path "$OUT/tiny/tiny_sdxl.safetensors" --train_data_dir "$OUT/tiny/train" --resolution 64
      --enable_bucket --min_bucket_reso 32 --max_bucket_reso 128 --bucket_reso_steps 32 --max_data_loader_n_workers 0
      --seed 1 --train_batch_size 2 --max_train_steps 3 --learning_rate 1e-4 --optimizer_type AdamW --output_name ft
      --mixed_precision bf16 --train_text_encoder --learning_rate_te1 1e-5 --learning_rate_te2 1e-5)
L=("$PY" -m accelerate.commands.launch --num_processes 1 --num_machines 1 --dynamo_backend no --mixed_precision bf16)
check() {  # name, then the command
  local name=$1; shift; rm -rf "$OUT/$name"
  if timeout 300 "$@" --output_dir "$OUT/$name" > "$OUT/$name.log" 2>&1 && "$PY" - "$OUT/$name/ft.safetensors" "$OUT/tiny" >> "$OUT/$name.log" 2>&1 <<'PY'
import sys, torch
from safetensors.torch import load_file
from diffusers import StableDiffusionXLPipeline
path, tiny = sys.argv[1], sys.argv[2]
pipe = StableDiffusionXLPipeline.from_single_file(path, config=f"{tiny}/tiny_sdxl_diffusers")
a, b = load_file(path), load_file(f"{tiny}/tiny_sdxl.safetensors")
assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith("model.diffusion_model.")), "U-Net unchanged"
print("loaded in diffusers:", type(pipe.unet).__name__)
PY
  then echo "PASS $name"; else echo "FAIL $name: $(grep -E 'Error|error:' "$OUT/$name.log" | grep -v ChildFailedError | tail -1)"; fi
}
check fsdp2 "${L[@]}" --use_fsdp --fsdp_version 2 --fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP \
  --fsdp_transformer_layer_cls_to_wrap BasicTransformerBlock,ResnetBlock2D,CLIPEncoderLayer --fsdp_state_dict_type SHARDED_STATE_DICT \
  sdxl_train.py "${ARGS[@]}"
check zero2 "${L[@]}" --use_deepspeed sdxl_train.py "${ARGS[@]}" --deepspeed --zero_stage 2
# ZeRO-3 trains the U-Net only: with --train_text_encoder transformers' CLIP reads a partitioned weight's
# shape outside its gathered submodule ("max_position_embeddings: 0"; seen on the CPU, see docs/multi_gpu.md)
check zero3 "${L[@]}" --use_deepspeed sdxl_train.py "${ARGS[@]:0:${#ARGS[@]}-5}" --deepspeed --zero_stage 3 --zero3_save_16bit_model
