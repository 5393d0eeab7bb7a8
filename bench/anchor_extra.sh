#!/usr/bin/env bash
# Add configs to the side-by-side harness (../shared/anchor_bench/run.sh) without changing it:
#   H = B + --torch_compile   I = D + --torch_compile   J = C + --torch_compile
# usage: bash bench/anchor_extra.sh HARNESS_DIR   -> writes HARNESS_DIR/run_extra.sh (run it like run.sh)
set -eu
python3 - "$1" <<'PY'
import pathlib, sys
d = pathlib.Path(sys.argv[1])
lines = (d / "run.sh").read_text().splitlines()
extra_desc = ['DESC[H]="B + --torch_compile"; KIND[H]=train; BS[H]=1; CAP[H]=200',
              'DESC[I]="D + --torch_compile"; KIND[I]=train; BS[I]=1; CAP[I]=200',
              'DESC[J]="C + --torch_compile"; KIND[J]=train; BS[J]=4; CAP[J]=200',
              'NAME_H=H_lora_r8_bs1_gc_adafactor_compile; NAME_I=I_full_ft_bs1_compile; NAME_J=J_lora_r32_bs4_compile']
extra_case = ['    H) cfg_cmd B; CMD+=(--torch_compile); return ;;',
              '    I) cfg_cmd D; CMD+=(--torch_compile); return ;;',
              '    J) cfg_cmd C; CMD+=(--torch_compile); return ;;']
out = []
for line in lines:
    out.append(line)
    if line.startswith("NAME_A="):
        out += extra_desc
    if line.strip().startswith("G) cfg_cmd E;"):
        out += extra_case
assert len(out) == len(lines) + len(extra_desc) + len(extra_case), "run.sh layout changed"
(d / "run_extra.sh").write_text("\n".join(out) + "\n")
PY
