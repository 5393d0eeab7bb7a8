#!/usr/bin/env bash
# On a CPU machine: do both tools accept every command line of the configs bench/anchor_extra.sh adds?
# Nothing loads a model. sd-scripts: its own argparse and verify functions (the harness' ANCHOR_PARSE_ONLY=1);
# the project: bench/anchor_parse_ours.py, which also scans the dataset and the control images.
# usage (project root): bash bench/anchor_parse_check.sh [HARNESS_DIR, default .anchor_bench]
#   ANCHOR_CONFIGS picks the configs (default: all added ones); needs HARNESS_DIR from fetch_wheels.sh.
set -eu
HB="${1:-.anchor_bench}"
W="${ANCHOR_WORK:-/tmp/anchor_parse_$(id -u)}"
mkdir -p "$W"
bash "$(dirname "$0")/anchor_extra.sh" "$HB"
# sd-scripts imports cv2, einops and torchvision at module level; parsing uses none of them. They go into
# sd-scripts' own package folder only (the harness installs its wheels there; .anchor_ok says it is done):
# einops and OpenCV from PyPI, torchvision as a stub (a build matching the local torch is not needed to parse).
SITE="$W/kohya_site"
if [ ! -f "$SITE/.anchor_ok" ]; then
  rm -rf "$SITE"
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$HB"/whl/*.whl
  python3 -m pip install -q --no-deps --target "$SITE" einops opencv-python-headless
  mkdir -p "$SITE/torchvision/transforms"
  : > "$SITE/torchvision/__init__.py"
  cat > "$SITE/torchvision/transforms/__init__.py" <<'EOF2'
"""Parse-check stub: every name is a do-nothing object."""


class _Any:
    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        return self

    def __getattr__(self, name):
        return _Any()


def __getattr__(name):
    return _Any()
EOF2
  touch "$SITE/.anchor_ok"
fi
# stand-ins: the harness' 16-image dataset (1024 px) and a checkpoint file that only has to exist
[ -d "$W/data_1024px_16/10_test" ] || python3 "$HB/harness/build_assets.py" dataset --out "$W/data_1024px_16" --n 16 --size 1024
[ -f "$W/sdxl_random_fp16.safetensors" ] || : > "$W/sdxl_random_fp16.safetensors"
ANCHOR_WORK="$W" ANCHOR_SITE="$SITE" ANCHOR_OURS_SITE="$W/ours_site" \
  ANCHOR_PARSE_ONLY=1 ANCHOR_CONFIGS="${ANCHOR_CONFIGS:-H I N J K O L M P Q R S V W X Y Z}" bash "$HB/run_extra.sh" 2>&1 | tee "$W/parse_check.log"
ok=$(grep -cE '] parse .* rc=0:' "$W/parse_check.log" || true)
bad=$(grep -cE '] parse .* (rc=[1-9]|skipped)' "$W/parse_check.log" || true)
echo "parse check: $ok command lines accepted, $bad rejected or not checked (log: $W/parse_check.log)"
[ "$bad" = 0 ] && [ "$ok" -gt 0 ]
