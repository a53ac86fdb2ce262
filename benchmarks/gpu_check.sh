#!/usr/bin/env bash
# gpu_check.sh: one-shot validation of quietstar on a CUDA GPU (written for H100/H200), from the repository root,
# with no network, in about 8 minutes. Stages, each under its own timeout, one verdict line each:
#   (a) machine and versions; (b) quietstar imports (else kernel-only stages on a stub package)
#   (c) compiled Triton tests and every Hopper kernel config in bf16 vs quietstar_torch, in parallel
#   (e) whole-model step, quietstar_triton vs quietstar_torch (benchmarks/gpu_check/model_step.py)
#   (d) benchmarks/attention.py, H 32 D 128 bf16, one process per (L, S), CSV out
#   (g) benchmarks/train_throughput.py on SmolLM2-135M's shape (random weights), bf16 autocast, MFU
#   (h) benchmarks/step_settings.py --compare thought-forward: replay vs incremental on the same shape
#   (i) benchmarks/gpu_check/lora_7b_memory.py: train/configs/mistral7b_lora.yaml's step on Mistral-7B's shape
# Stages run in the order c, e, g, h, d, i (most needed first: the budget may cut the last ones).
# Writes $OUT/log.txt, attention_gpu.csv, throughput.txt, thought_forward.txt, lora_7b.txt ($OUT: ./gpu_out).
# Knobs: BUDGET=520 (s, all stages), BENCH_L, BENCH_S, DESIGN_SHAPES (BxL ...), LORA_SHAPES,
#        SKIP_TESTS/SKIP_MODEL/SKIP_THROUGHPUT/SKIP_DESIGNS/SKIP_BENCH/SKIP_LORA=1.
#
# Needs transformers >= the version pyproject.toml names (5.17, what common GPU images ship). For a missing or older
# package: on a networked machine, `pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl NAME==X`
# into a git-ignored .whl/ that travels with the tree; this script installs .whl/*.whl into /tmp/site first. If
# quietstar still cannot be imported, only the kernel stages run.
OUT=${OUT:-$PWD/gpu_out}; Q=/tmp/quietstar_gpu_check; mkdir -p "$OUT" $Q; : >$Q/summary; T0=$SECONDS
BUDGET=${BUDGET:-520}; PY=${PY:-python3}; HERE=benchmarks/gpu_check
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRITON_INTERPRET=0 TOKENIZERS_PARALLELISM=false

stage() {  # stage NAME LIMIT CMD...: CMD under a timeout (clipped to the budget left); never aborts the script
  local name=$1 limit=$2 t=$SECONDS left=$((BUDGET - SECONDS + T0)) rc verdict; shift 2
  if ((left < 20)); then echo "@@ $name: SKIPPED (budget)" | tee -a $Q/summary; return; fi
  ((limit > left)) && limit=$left
  echo "### [$name] at +$((SECONDS - T0))s, limit ${limit}s: $*"
  timeout -k 10 $limit "$@"; rc=$?
  case $rc in 0) verdict=PASS ;; 124 | 137) verdict="TIMEOUT (${limit}s)" ;; *) verdict="FAIL rc=$rc" ;; esac
  echo "@@ $name: $verdict after $((SECONDS - t))s" | tee -a $Q/summary
}
background_stage() { stage "$@" >"$Q/$1.log" 2>&1 & }  # compile-bound test stages share the CPU cores

main() {
  echo "=== (a) machine, versions   $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null)"
  nvidia-smi || echo "!!! nvidia-smi failed"
  echo "=== (b) installing carried wheels (if any) and importing"
  local site=
  if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      && site=/tmp/site: && echo "installed: $(cd .whl && ls)"
  fi
  export PYTHONPATH=$site$PWD${PYTHONPATH:+:$PYTHONPATH}
  $PY -c "import torch, triton, transformers, accelerate; print('torch', torch.__version__, '| triton', triton.__version__,
'| transformers', transformers.__version__, '| accelerate', accelerate.__version__, '|', torch.cuda.get_device_name(),
torch.cuda.get_device_capability())" || echo "!!! version probe failed"
  local full=1 RUN=($PY $HERE/run_stub.py) XDIST=() TIMEOUT=()
  if $PY -c "import quietstar, triton_kernels as t; print('import OK;', t.is_available())"; then
    echo "@@ import quietstar: PASS" >>$Q/summary
  else
    full=0; export QS_STUB=1
    echo "@@ import quietstar: FAIL -> kernel stages on quietstar.layout/ops only, model stages skipped" | tee -a $Q/summary
  fi
  ((full)) && $PY -c "import xdist" 2>/dev/null && XDIST=(-n 4)
  $PY -c "import pytest_timeout" 2>/dev/null && TIMEOUT=(--timeout 140)
  local PYTEST=("${RUN[@]}" -m pytest -q -p no:cacheprovider -rfE "${TIMEOUT[@]}")

  if [[ ${SKIP_TESTS:-0} != 1 ]]; then
    echo "=== (c) compiled Triton tests (TRITON_INTERPRET=0) and the bf16 config sweep, in parallel; logs follow"
    QUIETSTAR_TRITON_AUTOTUNE=0 background_stage c1_gpu_marked 150 "${PYTEST[@]}" -v -m gpu tests/test_triton_attention.py
    background_stage c2_config_sweep_bf16 150 "${RUN[@]}" $HERE/sweep_configs.py
    QUIETSTAR_TRITON_AUTOTUNE=0 background_stage c3_fp16_cached 150 "${PYTEST[@]}" -m "not gpu" -k "not fp32 and not lse_grad" tests/test_triton_attention.py
    QUIETSTAR_TRITON_AUTOTUNE=0 background_stage c4_fp32_lse 150 "${PYTEST[@]}" "${XDIST[@]}" -m "not gpu" -k "fp32 or lse_grad" tests/test_triton_attention.py
    wait
    cat $Q/c1_*.log $Q/c2_*.log $Q/c3_*.log $Q/c4_*.log
  fi

  if [[ ${SKIP_MODEL:-0} != 1 ]]; then
    echo "=== (e) whole-model step: tiny Llama, quietstar_triton vs quietstar_torch"
    if ((full)); then stage e_model_step 100 $PY $HERE/model_step.py
    else echo "@@ e_model_step: SKIPPED (quietstar does not import)" | tee -a $Q/summary; fi
  fi

  if [[ ${SKIP_THROUGHPUT:-0} != 1 ]]; then
    echo "=== (g) training throughput, SmolLM2-135M shape (random weights), bf16 autocast, L 256, B 4, N 9, K 4, P 2"
    if ((full)); then
      for attn in quietstar_triton quietstar_torch; do
        stage g_throughput_$attn 90 $PY benchmarks/train_throughput.py --models smollm2-shape --seq-len 256 --batch 4 \
          --n-thought 9 --n-talk 4 --passes 2 --steps 5 --warmup 2 --attn $attn 2>&1 | tee -a "$OUT/throughput.txt"
      done
    else echo "@@ g_throughput: SKIPPED (quietstar does not import)" | tee -a $Q/summary; fi
  fi

  if [[ ${SKIP_DESIGNS:-0} != 1 ]]; then
    echo "=== (h) thought forward, replay vs incremental: SmolLM2-135M shape, quietstar_triton, bf16 autocast"
    if ((full)); then
      for shape in ${DESIGN_SHAPES:-4x256 1x1024}; do  # B 4 at L 1024 needs ~108 GB without checkpointing
        stage h_thought_forward_$shape 90 $PY benchmarks/step_settings.py --compare thought-forward \
          --batch ${shape%x*} --lengths ${shape#*x} --rounds 3 2>&1 | tee -a "$OUT/thought_forward.txt"
      done
    else echo "@@ h_thought_forward: SKIPPED (quietstar does not import)" | tee -a $Q/summary; fi
  fi

  if [[ ${SKIP_BENCH:-0} != 1 ]]; then
    echo "=== (d) benchmarks/attention.py, H 32 D 128 bf16, autotune on, one process per (L, S)"
    for L in ${BENCH_L:-1024 2048 4096}; do for S in ${BENCH_S:-8 16}; do
      TRITON_PRINT_AUTOTUNING=1 stage d_bench_L${L}_S$S $((L < 4096 ? 60 : 90)) "${RUN[@]}" benchmarks/attention.py \
        --L $L --S $S --heads 32 --dim 128 --max-dense-mask-gib 1.5 --csv $Q/bench_L${L}_S$S.csv
    done; done
    awk 'FNR > 1 || NR == 1' $Q/bench_L*_S*.csv >"$OUT/attention_gpu.csv" 2>/dev/null
    column -s, -t "$OUT/attention_gpu.csv" 2>/dev/null || cat "$OUT/attention_gpu.csv"
  fi

  if [[ ${SKIP_LORA:-0} != 1 ]]; then
    echo "=== (i) train/configs/mistral7b_lora.yaml's step memory: Mistral-7B shape, random bf16 weights"
    if ((full)); then
      stage i_lora_7b 150 $PY $HERE/lora_7b_memory.py --shapes ${LORA_SHAPES:-4x256,2x1024} 2>&1 | tee "$OUT/lora_7b.txt"
    else echo "@@ i_lora_7b: SKIPPED (quietstar does not import)" | tee -a $Q/summary; fi
  fi

  echo "=== summary after $((SECONDS - T0))s"
  cat $Q/summary
  ! grep -Eq ': (FAIL|TIMEOUT)' $Q/summary
}
set -o pipefail
main 2>&1 | tee "$OUT/log.txt"
exit "${PIPESTATUS[0]}"
