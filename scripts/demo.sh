#!/usr/bin/env bash
# One command: set up a virtual environment, make the tiny demo model and images, train a LoRA on
# them for a few steps on the CPU, and generate an image with it.   Usage: bash scripts/demo.sh [OUT]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-demo_out}"

if [ ! -d .venv ]; then
  python3 -m venv .venv
fi
# shellcheck disable=SC1091
source .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet torch==2.13.0          # CPU build; use your CUDA build on a GPU machine
python -m pip install --quiet -e .

python tools/make_tiny_sdxl.py "$OUT"
python sdxl_train_network.py \
  --pretrained_model_name_or_path "$OUT/tiny_sdxl.safetensors" \
  --train_data_dir "$OUT/train" --resolution 64 --enable_bucket \
  --min_bucket_reso 32 --max_bucket_reso 128 --bucket_reso_steps 32 \
  --output_dir "$OUT/lora" --output_name demo_lora \
  --network_module networks.lora --network_dim 4 --network_alpha 4 --network_train_unet_only \
  --cache_latents --cache_text_encoder_outputs \
  --learning_rate 1e-3 --max_train_steps 10 --train_batch_size 2 --seed 1 \
  --max_data_loader_n_workers 0 --caption_extension .caption
python sdxl_gen_img.py --ckpt "$OUT/tiny_sdxl.safetensors" \
  --network_module networks.lora --network_weights "$OUT/lora/demo_lora.safetensors" --network_mul 1.0 \
  --prompt "sks circle, plain background --n blurry" --W 64 --H 64 --steps 8 --sampler euler_a --seed 42 \
  --outdir "$OUT/images"
echo "demo finished: LoRA in $OUT/lora, image in $OUT/images"
