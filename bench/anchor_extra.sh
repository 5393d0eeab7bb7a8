#!/usr/bin/env bash
# Add configs to the side-by-side harness (../shared/anchor_bench/run.sh) without changing it.
# usage: bash bench/anchor_extra.sh HARNESS_DIR   -> writes HARNESS_DIR/run_extra.sh (run it like run.sh)
#
#   H  textual inversion, batch 1 (4 vectors, --init_word cat, --use_object_template, AdamW 5e-3)
#   I  H at batch 4 + --gradient_checkpointing
#   T  H + --gradient_checkpointing (batch 1)   U  H at batch 4 without checkpointing
#   N  H + --torch_compile
#   J  ControlNet-LLLite (--network_dim 64 --cond_emb_dim 32, AdamW 2e-4), batch 1, on $DATA/10_test
#      with one edge-map control image per training image (bench/anchor_assets.py cond)
#   K  J at batch 4
#   O  E + --control_net_lllite_models (J's or K's file, sd-scripts' first; else a random one) + a guide image
#   L  E with the highres fix from 512 (--highres_fix_scale 0.5, 28 first-stage steps)
#   M  E with the highres fix from 768 (--highres_fix_scale 0.75)
#   P  B + --torch_compile   Q  D + --torch_compile   R  C + --torch_compile
#   S  A + --gradient_checkpointing (LoRA dim 32, AdamW, batch 1)
#   V  D + --fused_backward_pass (full fine-tune, Adafactor, --full_bf16, GC, batch 1); timed at the LR scheduler
#   W  C at batch 8 (LoRA dim 32 alpha 16, AdamW, no GC)          Z  W + --gradient_checkpointing
#   X  B + --fp8_base                                              Y  C + --gradient_checkpointing (batch 4)
# Memory caps that emulate smaller cards (bench/memcap/sitecustomize.py, first on both tools' PYTHONPATH):
#   ANCHOR_CONFIGS="B@8 B@12 D"  runs B capped at 8 GiB, then at 12 GiB, then D uncapped;
#   ANCHOR_MEM_CAPS="B=8 D=12"   the same for the bare letters listed (a letter may be listed with several caps).
#   A capped run is named <NAME>_cap<N>_<tool> (e.g. B_lora_r8_bs1_gc_adafactor_cap8_ours) and runs with
#   ANCHOR_MEM_GB=N: PyTorch's CUDA caching allocator of that process is capped at N GiB; an OOM is a failed run.
# Step timing at the LR scheduler (torch's LRScheduler.step, called once per optimizer update by both tools)
#   instead of the global optimizer-step hook, which a fused backward pass does not fire once per update:
#   config V always, and the letters in ANCHOR_SCHED_STEP (e.g. "D", to compare both timings on one config).
# ANCHOR_PARSE_ONLY=1 also checks the project's scripts (bench/anchor_parse_ours.py) when the dataset
# and the checkpoint file exist (bench/anchor_parse_check.sh builds small stand-ins on a CPU machine).
set -eu
python3 - "$1" <<'PY'
import pathlib, sys
d = pathlib.Path(sys.argv[1])
lines = (d / "run.sh").read_text().splitlines()

after_names = r'''
# ---- added by the project's bench/anchor_extra.sh -----------------------------------------------------------
DESC[H]="textual inversion bs1, 4 vectors, AdamW";     KIND[H]=train; BS[H]=1; CAP[H]=150
DESC[I]="textual inversion bs4 + grad ckpt";           KIND[I]=train; BS[I]=4; CAP[I]=180
DESC[T]="textual inversion bs1 + grad ckpt";           KIND[T]=train; BS[T]=1; CAP[T]=150
DESC[U]="textual inversion bs4, no grad ckpt";         KIND[U]=train; BS[U]=4; CAP[U]=180
DESC[N]="H + --torch_compile";                         KIND[N]=train; BS[N]=1; CAP[N]=300
DESC[J]="ControlNet-LLLite bs1 dim 64 cond 32 AdamW";  KIND[J]=train; BS[J]=1; CAP[J]=150
DESC[K]="ControlNet-LLLite bs4";                       KIND[K]=train; BS[K]=4; CAP[K]=180
DESC[O]="E + ControlNet-LLLite (guide image)";         KIND[O]=gen;   BS[O]=1; CAP[O]=120
DESC[L]="E + highres fix from 512 (0.5, 28+24 steps)"; KIND[L]=gen;   BS[L]=1; CAP[L]=120
DESC[M]="E + highres fix from 768 (0.75, 28+24 steps)"; KIND[M]=gen;  BS[M]=1; CAP[M]=120
DESC[P]="B + --torch_compile";                         KIND[P]=train; BS[P]=1; CAP[P]=200
DESC[Q]="D + --torch_compile";                         KIND[Q]=train; BS[Q]=1; CAP[Q]=200
DESC[R]="C + --torch_compile";                         KIND[R]=train; BS[R]=4; CAP[R]=200
DESC[S]="LoRA r32 bs1 AdamW + grad ckpt (A + GC)";     KIND[S]=train; BS[S]=1; CAP[S]=150
DESC[V]="D + --fused_backward_pass (sched-step timed)"; KIND[V]=train; BS[V]=1; CAP[V]=180
DESC[W]="LoRA r32 bs8 AdamW, no GC (C at bs8)";        KIND[W]=train; BS[W]=8; CAP[W]=200
DESC[X]="B + --fp8_base (LoRA r8 Adafactor GC, fp8)";   KIND[X]=train; BS[X]=1; CAP[X]=180
DESC[Y]="LoRA r32 bs4 AdamW + grad ckpt (C + GC)";     KIND[Y]=train; BS[Y]=4; CAP[Y]=180
DESC[Z]="LoRA r32 bs8 AdamW + grad ckpt (W + GC)";     KIND[Z]=train; BS[Z]=8; CAP[Z]=200
NAME_H=H_ti_bs1; NAME_I=I_ti_bs4_gc; NAME_T=T_ti_bs1_gc; NAME_U=U_ti_bs4; NAME_N=N_ti_bs1_compile; NAME_J=J_lllite_bs1; NAME_K=K_lllite_bs4
NAME_O=O_gen_lllite; NAME_L=L_gen_highres_512; NAME_M=M_gen_highres_768
NAME_P=P_lora_r8_bs1_gc_adafactor_compile; NAME_Q=Q_full_ft_bs1_compile; NAME_R=R_lora_r32_bs4_compile
NAME_S=S_lora_r32_bs1_gc; NAME_V=V_full_ft_bs1_gc_adafactor_fused; NAME_W=W_lora_r32_bs8; NAME_X=X_lora_r8_bs1_gc_adafactor_fp8
NAME_Y=Y_lora_r32_bs4_gc; NAME_Z=Z_lora_r32_bs8_gc
SCHED_STEP=" V ${ANCHOR_SCHED_STEP:-} "  # configs timed at LRScheduler.step (harness/*_timed_sched.py)
MEMCAP_PP="$OURS/bench/memcap:"  # bench/memcap/sitecustomize.py first on both tools' paths (no-op without ANCHOR_MEM_GB)
[ -f "$OURS/bench/memcap/sitecustomize.py" ] || { log "FATAL: no $OURS/bench/memcap/sitecustomize.py"; exit 7; }
declare -A MEMCAP_OF  # ANCHOR_MEM_CAPS="B=8 B=12 V=8": letter -> caps in GiB
for kv in ${ANCHOR_MEM_CAPS:-}; do
  [[ "$kv" =~ ^[A-Z]=[0-9]+([.][0-9]+)?$ ]] || { log "FATAL: ANCHOR_MEM_CAPS entry '$kv' is not LETTER=GiB"; exit 7; }
  MEMCAP_OF[${kv%%=*}]+=" ${kv#*=}"
done
RUNS=""  # ANCHOR_CONFIGS with each bare letter of ANCHOR_MEM_CAPS expanded to LETTER@GiB
for cc in $CONFIGS; do
  if [[ "$cc" != *@* ]] && [ -n "${MEMCAP_OF[$cc]:-}" ]; then for g in ${MEMCAP_OF[$cc]}; do RUNS+=" $cc@$g"; done
  else RUNS+=" $cc"; fi
done
TI_COMMON=(); for x in "${COMMON[@]}"; do [ "$x" = --cache_text_encoder_outputs ] || TI_COMMON+=("$x"); done  # TI cannot cache them
TI=(--token_string anchortok --init_word cat --num_vectors_per_token 4 --use_object_template
    --optimizer_type AdamW --learning_rate 5e-3)
LL_COMMON=("${COMMON[@]}")  # the image folder itself (repeats 1): the layout sd-scripts pairs control images in
for i in "${!LL_COMMON[@]}"; do [ "${LL_COMMON[$i]}" = --train_data_dir ] && LL_COMMON[$((i+1))]="$DATA/10_test"; done
COND="$W/cond_${IMGSZ}px_${NIMG}"
LL=(--conditioning_data_dir "$COND" --network_dim 64 --cond_emb_dim 32 --optimizer_type AdamW --learning_rate 2e-4)
HR_STEPS=28; [ "$SMOKE" = "1" ] && HR_STEPS=$GEN_STEPS
OURS_PY="$OSITE${BASE_PYTHONPATH:+:$BASE_PYTHONPATH}"
case " $CONFIGS " in *" J "*|*" K "*|*" O "*)
  if [ -d "$DATA/10_test" ]; then
    $PY "$OURS/bench/anchor_assets.py" cond --images "$DATA/10_test" --out "$COND" || { log "FATAL: control images"; exit 6; }
  fi ;;
esac
retarget() {  # retarget X: CMD's output folder and name become config X's (a variant never reuses its base's)
  local i
  for i in "${!CMD[@]}"; do
    case "${CMD[$i]}" in
      --output_dir|--outdir) CMD[$((i+1))]="$W/run_${1}_${tool:-kohya}" ;;
      --output_name) CMD[$((i+1))]="$1" ;;
    esac
  done
}
lllite_file() {  # the LLLite file O generates with: a file J or K trained (sd-scripts' first), else a random one
  local f
  for f in "$W/run_J_kohya/J.safetensors" "$W/run_J_ours/J.safetensors" "$W/run_K_kohya/K.safetensors" \
           "$W/run_K_ours/K.safetensors"; do
    [ -f "$f" ] && { log "O: LLLite file $f" >&2; echo "$f"; return; }
  done
  f="$W/lllite_random_c32_d64.safetensors"
  [ -f "$f" ] || PYTHONPATH="$OURS_PY" $PY "$OURS/bench/anchor_assets.py" lllite --out "$f" >&2
  log "O: LLLite file $f (random weights: no J/K file here)" >&2
  echo "$f"
}
setopt() {  # setopt --flag VALUE: the value after --flag in CMD becomes VALUE (the flag must be there)
  local i
  for i in "${!CMD[@]}"; do [ "${CMD[$i]}" = "$1" ] && { CMD[$((i+1))]="$2"; return 0; }; done
  log "FATAL: $1 is not in the command line"; exit 8
}
# ---- end of the additions ------------------------------------------------------------------------------------
'''.strip("\n").splitlines()

cases = r'''
    H) CMD=(--mode train --script sdxl_train_textual_inversion.py -- "${TI_COMMON[@]}" "${TI[@]}"
            --train_batch_size 1 --output_dir "$o" --output_name H) ;;
    I) CMD=(--mode train --script sdxl_train_textual_inversion.py -- "${TI_COMMON[@]}" "${TI[@]}"
            --train_batch_size 4 --gradient_checkpointing --output_dir "$o" --output_name I) ;;
    N) cfg_cmd H; retarget N; CMD+=(--torch_compile); return ;;
    T) cfg_cmd H; retarget T; CMD+=(--gradient_checkpointing); return ;;
    U) CMD=(--mode train --script sdxl_train_textual_inversion.py -- "${TI_COMMON[@]}" "${TI[@]}"
            --train_batch_size 4 --output_dir "$o" --output_name U) ;;
    J) CMD=(--mode train --script sdxl_train_control_net_lllite.py -- "${LL_COMMON[@]}" "${LL[@]}"
            --train_batch_size 1 --output_dir "$o" --output_name J) ;;
    K) CMD=(--mode train --script sdxl_train_control_net_lllite.py -- "${LL_COMMON[@]}" "${LL[@]}"
            --train_batch_size 4 --output_dir "$o" --output_name K) ;;
    O) cfg_cmd E; retarget O; CMD+=(--control_net_lllite_models "$(lllite_file)" --guide_image_path "$COND/img_000.png"); return ;;
    L) cfg_cmd E; retarget L; CMD+=(--highres_fix_scale 0.5 --highres_fix_steps $HR_STEPS); return ;;
    M) cfg_cmd E; retarget M; CMD+=(--highres_fix_scale 0.75 --highres_fix_steps $HR_STEPS); return ;;
    P) cfg_cmd B; retarget P; CMD+=(--torch_compile); return ;;
    Q) cfg_cmd D; retarget Q; CMD+=(--torch_compile); return ;;
    R) cfg_cmd C; retarget R; CMD+=(--torch_compile); return ;;
    S) cfg_cmd A; retarget S; CMD+=(--gradient_checkpointing); return ;;
    V) cfg_cmd D; retarget V; CMD+=(--fused_backward_pass); return ;;
    W) cfg_cmd C; retarget W; setopt --train_batch_size 8; return ;;
    X) cfg_cmd B; retarget X; CMD+=(--fp8_base); [ "$MP" = no ] && setopt --mixed_precision bf16; return ;;  # smoke: fp8 needs bf16
    Y) cfg_cmd C; retarget Y; CMD+=(--gradient_checkpointing); return ;;
    Z) cfg_cmd W; retarget Z; CMD+=(--gradient_checkpointing); return ;;
'''.strip("\n").splitlines()

ours_parse = r'''
  if [ "$tool" = ours ] && [ "$PARSE_ONLY" = "1" ]; then  # the project's scripts, stopped before the model load
    if [ -d "$DATA/10_test" ] && [ -f "$CKPT" ]; then
      PYTHONPATH="$OURS_PY" $PY "$OURS/bench/anchor_parse_ours.py" --proj "$OURS" "${CMD[@]}" > "$W/$NM.parse.log" 2>&1
      RC=$?; log "parse $c $NM rc=$RC: $(grep -E '^\[parse' "$W/$NM.parse.log")"
      [ $RC -ne 0 ] && tail -15 "$W/$NM.parse.log"
    else
      log "parse $c $NM skipped: no $DATA/10_test or $CKPT (bench/anchor_parse_check.sh makes stand-ins)"
    fi
    continue
  fi
'''.strip("\n").splitlines()

# sd-scripts' TI script checks the SDXL options with support_text_encoder_caching=False (it has no caching
# options); the harness' parse mode calls the check with the default, which fails on TI's namespace. The
# parse runs a copy that passes what the script itself passes (train runs keep kohya_timed.py unchanged).
kt = (d / "harness" / "kohya_timed.py").read_text()
call = "sdxl_train_util.verify_sdxl_training_args(args)"
assert kt.count(call) == 1, "kohya_timed.py layout changed; update bench/anchor_extra.sh"
(d / "harness" / "kohya_timed_parse.py").write_text(kt.replace(call, "sdxl_train_util.verify_sdxl_training_args("
    "args, support_text_encoder_caching=hasattr(args, 'cache_text_encoder_outputs_to_disk'))"))
parse_call = '$PY "$H/kohya_timed.py" --sd "$SD" --stats "$W/$NM.parse.jsonl"'

# Step timing at the LR scheduler: with --fused_backward_pass sd-scripts' sdxl_train.py never calls
# optimizer.step() (Adafactor's step_param runs in a gradient hook) and the project steps one optimizer per
# parameter, so the global optimizer-step hook is silent or fires per parameter. Both call
# lr_scheduler.step() once per update (accelerate's AcceleratedScheduler -> LRScheduler.step). The copies
# *_timed_sched.py emit the same "step" events from there; the scheduler's own step() in its constructor
# (_step_count still 0) is not an update and is not counted.
hook_line = "        register_optimizer_step_post_hook(post_hook)"
sched_hook = [
    "        _anchor_lr_step = torch.optim.lr_scheduler.LRScheduler.step  # added by bench/anchor_extra.sh",
    "",
    "        def _anchor_sched_step(self, *args, **kwargs):",
    "            constructing = getattr(self, '_step_count', 0) == 0  # the constructor's initial step()",
    "            r = _anchor_lr_step(self, *args, **kwargs)",
    "            if not constructing:",
    "                post_hook(None, args, kwargs)",
    "            return r",
    "",
    "        torch.optim.lr_scheduler.LRScheduler.step = _anchor_sched_step",
    "        print('[anchor] steps timed at torch.optim.lr_scheduler.LRScheduler.step', flush=True)",
]
for tool in ("kohya", "ours"):
    src = (d / "harness" / f"{tool}_timed.py").read_text()
    assert src.count(hook_line + "\n") == 1, f"{tool}_timed.py layout changed; update bench/anchor_extra.sh"
    (d / "harness" / f"{tool}_timed_sched.py").write_text(src.replace(hook_line + "\n", "\n".join(sched_hook) + "\n"))

# the timed commands: memcap first on PYTHONPATH, ANCHOR_MEM_GB set for a capped run, the _sched copy where asked
kohya_run = 'timeout -k 10 $T $PY "$H/kohya_timed.py" --sd "$SD" --stats "$W/$NM.stats.jsonl" "${CMD[@]}"'
ours_run = 'PYTHONPATH="$OSITE${BASE_PYTHONPATH:+:$BASE_PYTHONPATH}" timeout -k 10 $T $PY "$H/ours_timed.py" --proj "$OURS"'
loop_vars = [
    "for cc in $RUNS; do  # (bench/anchor_extra.sh) CONFIG or CONFIG@GiB",
    ' c="${cc%%@*}"; MEMCAP=""; [[ "$cc" == *@* ]] && MEMCAP="${cc#*@}"',
    ' [[ -z "$MEMCAP" || "$MEMCAP" =~ ^[0-9]+([.][0-9]+)?$ ]] || { log "FATAL: \'$cc\': the cap after @ is not a number"; exit 7; }',
    ' TSFX=""; [[ "$SCHED_STEP" == *" $c "* ]] && TSFX=_sched',
]

# (anchor line, where the new lines go, lines, replace the anchor line?)
def sub(old, new):
    return lambda line: [line.replace(old, new)]


edits = [(lambda s: s.startswith("NAME_A="), after_names, False),
         (lambda s: s.strip().startswith("G) cfg_cmd E;"), cases, False),
         (lambda s: s.strip() == '[ "$tool" = ours ] && [ "$PARSE_ONLY" = "1" ] && continue', ours_parse, True),
         (lambda s: parse_call in s, sub("kohya_timed.py", "kohya_timed_parse.py"), True),
         (lambda s: s == "for c in $CONFIGS; do", loop_vars, True),
         (lambda s: 'NM="${!nm_var}_$tool"' in s and '$tool: ${DESC[$c]}"' in s,
          lambda line: [line.replace('NM="${!nm_var}_$tool"', 'NM="${!nm_var}${MEMCAP:+_cap$MEMCAP}_$tool"')
                        .replace('$tool: ${DESC[$c]}"', '$tool: ${DESC[$c]}${MEMCAP:+ (cap $MEMCAP GiB)}"')], True),
         (lambda s: kohya_run in s,
          sub(kohya_run, 'PYTHONPATH="$MEMCAP_PP$PYTHONPATH" ANCHOR_MEM_GB="$MEMCAP" '
                         + kohya_run.replace("kohya_timed.py", "kohya_timed$TSFX.py")), True),
         (lambda s: ours_run in s,
          sub(ours_run, ours_run.replace('PYTHONPATH="$OSITE', 'PYTHONPATH="$MEMCAP_PP$OSITE')
              .replace("ours_timed.py", "ours_timed$TSFX.py").replace(" timeout", ' ANCHOR_MEM_GB="$MEMCAP" timeout', 1)),
          True)]
out, hits = [], [0] * len(edits)
for line in lines:
    done = False
    for k, (match, new, replace) in enumerate(edits):
        if match(line):
            hits[k] += 1
            if not replace:
                out.append(line)
            out += new(line) if callable(new) else new
            done = True
            break
    if not done:
        out.append(line)
assert hits == [1] * len(edits), f"run.sh layout changed (anchor lines found {hits} times); update bench/anchor_extra.sh"
(d / "run_extra.sh").write_text("\n".join(out) + "\n")
print(f"wrote {d / 'run_extra.sh'}: configs H I T U N J K O L M P Q R S V W X Y Z added, "
      "memory caps (CONFIG@GiB, ANCHOR_MEM_CAPS), LR-scheduler step timing (V, ANCHOR_SCHED_STEP)")
PY
