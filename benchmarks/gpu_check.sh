#!/usr/bin/env bash
# gpu_check.sh: quietstar on one CUDA GPU (written for the H100/H200), from the repository root, no network.
#
# The call a session with a GPU makes (after, on this networked machine, from the repository root:
#   benchmarks/gpu_check/official_prepare.sh vendor <git dir of the fetch of github:ezelikman/quiet-star>
#   benchmarks/gpu_check/official_prepare.sh wheels      # ~12 MiB of cp312 wheels into gpu_vendor/wheels
# ; gpu_vendor/ is git-ignored and travels as a carried path):
#   run(command="STAGES=correctness,official,generation,throughput BUDGET=530 bash benchmarks/gpu_check.sh",
#       carry=["gpu_vendor"], timeout_s=570)
# Second, short call, only if a stage failed or timed out (its name from the summary; same carry):
#   run(command="STAGES=<failed stages> BUDGET=200 bash benchmarks/gpu_check.sh", carry=["gpu_vendor"], timeout_s=230)
#
# Stages, in order of need (STAGES=comma-separated names; default: the four of the call above):
#   correctness  in parallel, autotune off (QUIETSTAR_TRITON_AUTOTUNE=0: the defaults won every sweep):
#                compiled Triton kernel tests, the whole-model step triton vs torch (gpu_check/model_step.py),
#                tests/test_thought_forward.py, tests/test_triton_model.py, tests/test_generation_compiled.py
#                (the compiled decode step under CUDA graphs)                                     ~150 s
#   official     step_vs_length.py: ours (quietstar_triton) vs the official code, SmolLM2-135M's size as a
#                Mistral, bf16, N 9 K 4 P 2, B 4 L 256 and B 1 L 512/1024/2048, a B 1 memory ceiling,
#                one profiled step per side                                                    ~170 s
#   generation   generation.py: tokens/s plain vs thinking (N 4, 9), batch 1 and 8, dynamic vs compiled
#                decode, and the official way (full forward per token) at a 512-token prompt   ~150 s
#   throughput   train_throughput.py, SmolLM2-135M shape, B 4 L 256, quietstar_triton              ~40 s
#   on request only (figures already recorded): sweeps (every Hopper kernel config), attention (kernel
#   vs FlexAttention, autotune on), designs (replay vs incremental), lora (Mistral-7B LoRA memory)
# Files back in $OUT (at most 8): log.txt (everything, summary last), official.txt, official.jsonl,
#   profile.txt (top kernels per side), generation.txt, generation.jsonl, throughput.txt.
# DRY_RUN=1 prints each selected stage's commands and limits and runs nothing (tests/test_gpu_check.py).
OUT=${OUT:-$PWD/gpu_out}; Q=/tmp/quietstar_gpu_check; mkdir -p "$OUT" $Q; : >$Q/summary; T0=$SECONDS
BUDGET=${BUDGET:-530}; PY=${PY:-python3}; HERE=benchmarks/gpu_check; DRY=${DRY_RUN:-0}
STAGES=${STAGES:-correctness,official,generation,throughput}; SITE=/tmp/official_site
ALL_STAGES=correctness,official,generation,throughput,sweeps,attention,designs,lora
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRITON_INTERPRET=0 TOKENIZERS_PARALLELISM=false

wanted() { [[ ,$STAGES, == *,$1,* ]]; }
stage() {  # stage NAME LIMIT CMD...: CMD under a timeout (clipped to the budget left); never aborts the script
  local name=$1 limit=$2 t=$SECONDS left=$((BUDGET - SECONDS + T0)) rc verdict; shift 2
  if ((DRY)); then echo "[dry-run] $name (limit ${limit}s): $*"; return; fi
  if ((left < 20)); then echo "@@ $name: SKIPPED (budget)" | tee -a $Q/summary; return; fi
  ((limit > left)) && limit=$left
  echo "### [$name] at +$((SECONDS - T0))s, limit ${limit}s: $*"
  timeout -k 10 $limit "$@"; rc=$?
  case $rc in 0) verdict=PASS ;; 124 | 137) verdict="TIMEOUT (${limit}s)" ;; *) verdict="FAIL rc=$rc" ;; esac
  echo "@@ $name: $verdict after $((SECONDS - t))s" | tee -a $Q/summary
}
background_stage() { if ((DRY)); then stage "$@"; else stage "$@" >"$Q/$1.log" 2>&1 & fi; }

setup() {
  echo "=== machine, versions   $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null)"
  ((DRY)) && return
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "!!! nvidia-smi failed"
  local site=
  if ls .whl/*.whl >/dev/null 2>&1; then  # the project's own missing packages, if any travelled
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && site=/tmp/site:
  fi
  export PYTHONPATH=$site$PWD${PYTHONPATH:+:$PYTHONPATH}
  $PY -c "import torch, triton, transformers; print('torch', torch.__version__, '| triton', triton.__version__,
'| transformers', transformers.__version__, '|', torch.cuda.get_device_name(), torch.cuda.get_device_capability())"
  $PY -c "import quietstar, triton_kernels as t; print('import quietstar OK; triton kernels:', t.is_available())" \
    || echo "@@ import quietstar: FAIL (every stage below will fail)" | tee -a $Q/summary
  if wanted official; then  # the official code and its transformers 4.37, in their own folder
    PY=$PY $HERE/official_prepare.sh install $SITE >$Q/official_install.log 2>&1 \
      && echo "official install: $(tail -1 $Q/official_install.log)" \
      || { cat $Q/official_install.log; echo "@@ official install: FAIL (carry gpu_vendor/, see official_prepare.sh)" | tee -a $Q/summary; }
  fi
}

correctness() {
  local PYTEST=($PY -m pytest -q -p no:cacheprovider -rfE) T=()
  $PY -c "import pytest_timeout" 2>/dev/null && T=(--timeout 140)
  export QUIETSTAR_TRITON_AUTOTUNE=0
  background_stage c1_kernel_gpu 150 "${PYTEST[@]}" "${T[@]}" -m gpu tests/test_triton_attention.py
  background_stage c2_kernel_compiled 150 "${PYTEST[@]}" "${T[@]}" -m "not gpu" tests/test_triton_attention.py
  background_stage c3_model_step 150 $PY $HERE/model_step.py
  background_stage c4_model_tests 150 "${PYTEST[@]}" "${T[@]}" tests/test_triton_model.py tests/test_thought_forward.py
  background_stage c5_compiled_decode 150 "${PYTEST[@]}" "${T[@]}" tests/test_generation_compiled.py
  wait
  ((DRY)) || cat $Q/c*.log
  unset QUIETSTAR_TRITON_AUTOTUNE
}

official() {
  QUIETSTAR_TRITON_AUTOTUNE=0 stage official 170 $PY benchmarks/step_vs_length.py --model smollm2-mistral \
    --lengths 4x256,1x512,1x1024,1x2048 --ceiling 4096,8192,16384 --kinds plain,quietstar --steps 3 --profile \
    --official $SITE --timeout 110 --json "$OUT/official.jsonl" 2>"$OUT/profile.txt" | tee "$OUT/official.txt"
}

generation() {
  stage generation 150 $PY benchmarks/generation.py --models smollm2-shape --batch 1 8 --n-thought-tokens 4 9 \
    --decode dynamic compiled --new-tokens 24 --repeats 2 --naive-prompt-len 512 --naive-tokens 4 \
    --json "$OUT/generation.jsonl" 2>&1 | tee "$OUT/generation.txt"
}

throughput() {
  QUIETSTAR_TRITON_AUTOTUNE=0 stage throughput 60 $PY benchmarks/train_throughput.py --models smollm2-shape --seq-len 256 \
    --batch 4 --n-thought 9 --n-talk 4 --passes 2 --steps 5 --warmup 2 --attn quietstar_triton 2>&1 | tee "$OUT/throughput.txt"
}

sweeps() { stage sweeps 150 $PY $HERE/run_stub.py $HERE/sweep_configs.py; }
attention() {
  for L in ${BENCH_L:-1024 2048 4096}; do
    TRITON_PRINT_AUTOTUNING=1 stage attention_L$L 90 $PY benchmarks/attention.py --L $L --S 16 --heads 32 --dim 128 \
      --max-dense-mask-gib 1.5
  done
}
designs() {
  for shape in ${DESIGN_SHAPES:-4x256 1x1024}; do
    stage designs_$shape 90 $PY benchmarks/step_settings.py --compare thought-forward --batch ${shape%x*} \
      --lengths ${shape#*x} --rounds 3
  done
}
lora() { stage lora 150 $PY $HERE/lora_7b_memory.py --shapes ${LORA_SHAPES:-4x256,2x1024}; }

main() {
  local s
  for s in ${STAGES//,/ }; do
    [[ ,$ALL_STAGES, == *,$s,* ]] || { echo "unknown stage '$s'; choose from $ALL_STAGES"; return 2; }
  done
  setup
  for s in ${ALL_STAGES//,/ }; do
    wanted $s && { echo "=== stage $s at +$((SECONDS - T0))s"; $s; }
  done
  echo "=== summary after $((SECONDS - T0))s (stages: $STAGES)"
  cat $Q/summary
  ! grep -Eq ': (FAIL|TIMEOUT)' $Q/summary
}
set -o pipefail
main 2>&1 | tee "$OUT/log.txt"
exit "${PIPESTATUS[0]}"
