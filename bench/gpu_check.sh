#!/usr/bin/env bash
# One prepared GPU check for a CUDA machine (written for an H200 with python3 + torch 2.11 +
# triton 3.6 + pytest, pytest-benchmark, matplotlib, tqdm; no network). Installs nothing; runs
# from the working tree with PYTHONPATH=. (never a venv). Stages (STAGES=tests,autotune,kernels,
# models; default all, so a rerun can repeat only what failed):
#
#   1. nvidia-smi / versions / `tilefuse info`                          (always)
#      beside it and step 2: tilefuse build-ext (the C++ autograd node)  (timeout 60 s)
#   2. tests:    pytest -m cuda in 3 parallel shards, verbose, slowest listed (timeout 150 s)
#                pytest-benchmark of matmul+bias+GELU vs eager           (timeout 25 s)
#   3. autotune: tilefuse autotune for the shipped shape sets, export the table under the
#                name the shipped-table lookup expects (tables/<identity slug>.json)
#                                                                         (timeouts 95 s in all)
#   4. kernels:  tilefuse bench kernels, matmul/norm/int8 first, no torch.compile (timeout 60 s,
#                budget 45 s), then matmul with torch.compile too        (timeout 30 s, budget 15 s)
#                tilefuse bench host: tiny ops per call vs torch          (timeout 25 s)
#   5. models:   eager + patched, fp16 + int8, batch 1 and 32, proxies  (timeout 60 s, budget 45 s)
#                the training-step table (ResNet-50, batch 32)           (timeout 45 s, budget 30 s)
#                torch.compile variants, small models first              (timeout 40 s, budget 25 s)
#
# The step timeouts add up to 550 s (~9 min, worst case; the three test shards run side by side);
# budgets end the bench steps early and cleanly, and the kernel and model benches save a partial
# report after every family / configuration. Everything is written under $OUT (default ./out/gpu_check) and packed into at
# most 8 files: summary.md, results.tar.gz (every log, JSON, Markdown and plot, laid out as
# bench/results/<gpu>/<date>/ so it can be unpacked at the repo root) and the six JSON reports.
# Usage:  OUT=/some/dir bash bench/gpu_check.sh      (PYTHON=... another interpreter,
#         STAGES=tests,kernels a subset)
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET TILEFUSE_BACKEND
export MPLBACKEND=Agg TILEFUSE_NO_PROGRESS=1 PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
STAGES="${STAGES:-tests,autotune,kernels,models}"
want() { case ",$STAGES," in *",$1,"*) return 0;; *) return 1;; esac; }
OUT="${OUT:-$PWD/out/gpu_check}"
mkdir -p "$OUT"
rm -f "$OUT"/summary.md "$OUT"/results.tar.gz "$OUT"/*.json   # no stale files from an earlier run
WORK="$(mktemp -d)"
STEPS="$WORK/steps.tsv"
T0=$(date +%s)
export TILEFUSE_CACHE_DIR="$WORK/autotune_cache"   # the tuning DB of this run comes back too
# no tuning on first use inside tests/benchmarks (seconds per new shape): step 4 tunes explicitly
# (the CLI ignores this flag) and later steps read its DB
export TILEFUSE_AUTOTUNE=0

step() {  # step NAME TIMEOUT_S CMD...   (never aborts the script)
  local name="$1" limit="$2"; shift 2
  local s=$(date +%s)
  echo "=== [$name] (timeout ${limit}s): $*" | tee -a "$WORK/all.log"
  timeout --kill-after=10 "$limit" "$@" > "$WORK/$name.log" 2>&1
  local rc=$?
  local dt=$(( $(date +%s) - s ))
  tail -n 15 "$WORK/$name.log" | tee -a "$WORK/all.log"
  local status=ok; [ $rc -ne 0 ] && status="rc=$rc"; [ $rc -eq 124 ] && status="TIMEOUT"
  printf "%s\t%s\t%ss\t%s\n" "$name" "$status" "$dt" "$*" >> "$STEPS"
}

# the C++ autograd node (tilefuse build-ext, ~10-30 s of one core) compiles beside steps 1-2;
# the host bench (step 4) waits for it, earlier steps use whichever path is there when they start
( step build_ext 60 $PY -m tilefuse build-ext --verbose ) &
EXT_PID=$!

# 1. environment
{ nvidia-smi || true; echo; $PY -c "import sys, torch, triton; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda); print('triton', triton.__version__); print('gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)"; git rev-parse HEAD 2>/dev/null; git status --short 2>/dev/null | head -50; } > "$WORK/env.log" 2>&1
step info 20 $PY -m tilefuse info
GPU="$($PY -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')" 2>/dev/null || echo unknown)"
SLUG="$(echo "$GPU" | tr 'A-Z' 'a-z' | sed -E 's/^nvidia //; s/[^a-z0-9]+/-/g; s/^-|-$//g')"
DATE="$(date -u +%Y-%m-%d)"
RES="$WORK/bench/results/$SLUG/$DATE"
mkdir -p "$RES"

# 2. tests
if want tests; then
  # three pytest processes share the GPU so that one shard's kernel compiles overlap the others';
  # the GPU tests are the ones marked cuda (no file lists: tests/conftest.py deals files to shards)
  PYT="$PY -m pytest -v -m cuda -p no:cacheprovider -rfE --durations=10"
  ( step pytest_cuda_0 150 $PYT --shard 0/3 tests ) &
  ( step pytest_cuda_1 150 $PYT --shard 1/3 tests ) &
  ( step pytest_cuda_2 150 $PYT --shard 2/3 tests ) &
  wait
  cat "$WORK"/pytest_cuda_0.log "$WORK"/pytest_cuda_1.log "$WORK"/pytest_cuda_2.log \
    > "$WORK/pytest_cuda.log" 2>/dev/null
  step pytest_benchmark 25 $PY -m pytest -q -p no:cacheprovider tests/bench --benchmark-enable \
    --benchmark-json="$RES/pytest-benchmark.json" --benchmark-max-time=0.5
fi

# 3. autotune (only if this tree has the command)
if want autotune && $PY -m tilefuse autotune --help > /dev/null 2>&1; then
  # the shipped-table lookup reads tilefuse/autotune/tables/<identity slug>.json
  TSLUG="$($PY -c "from tilefuse.autotune.identity import current_identity as c; print(c().slug)" 2>/dev/null || echo "$SLUG")"
  step autotune_matmul 30 $PY -m tilefuse autotune --kernels matmul --budget-s 18 --no-progress
  step autotune_int8_norm 25 $PY -m tilefuse autotune --kernels int8_matmul,layer_norm \
    --budget-s 12 --max-configs 4 --no-progress
  step autotune_resnet50 12 $PY -m tilefuse autotune --shapes model:resnet50 --budget-s 5 --no-progress
  step autotune_textcls 12 $PY -m tilefuse autotune --shapes model:textcls --budget-s 5 --no-progress
  mkdir -p "$RES/autotune"
  step autotune_export 16 $PY -m tilefuse autotune --export "$RES/autotune/$TSLUG.json"
elif want autotune; then
  printf "autotune\tskipped\t0s\t'tilefuse autotune' not available in this tree\n" >> "$STEPS"
fi

# 4. kernel benchmarks (families in priority order: the budget is spent on the first ones)
if want kernels; then
  step bench_kernels 60 $PY -m tilefuse bench kernels --dtype bf16 --impls tilefuse,eager,vendor \
    --only matmul,norm,int8,conv,fp8,depthwise,dropout,cross_entropy,optim \
    --time-budget 45 --out "$RES/kernels" --no-progress
  step bench_kernels_compile 30 $PY -m tilefuse bench kernels --only matmul --dtype bf16 --impls all \
    --time-budget 15 --out "$RES/kernels_compile" --no-progress
  # real per-call time of tiny ops (launch included) vs torch: the host-path proxy's GPU check
  mkdir -p "$RES/host"
  wait "$EXT_PID" 2>/dev/null
  step bench_host 25 $PY -m tilefuse bench host --calls 50 --repeats 5 --json "$RES/host/host.json"
fi

# 5. model benchmarks
if want models; then
  step bench_models 60 $PY -m tilefuse bench models --variants eager,patched --dtype fp16,int8 \
    --batch 1,32 --runs 200 --time-budget 45 --no-train --out "$RES/models" --no-progress
  step bench_train 45 $PY -m tilefuse bench models --no-inference --train-model resnet50 \
    --train-batch 32 --runs 200 --time-budget 30 \
    --train-configs fp32,amp,fp32+cudnn_benchmark,fp32+checkpoint,fp32+fused,fp32+fused+fused_optim,amp+fused \
    --out "$RES/train" --no-progress
  step bench_models_compile 40 $PY -m tilefuse bench models --variants compile,patched+compile \
    --models textcls,mobilenet_v2,resnet50 --dtype fp16 --batch 1 --runs 200 --no-proxies \
    --no-train --time-budget 25 --out "$RES/models_compile" --no-progress
fi

# a bench step killed by its timeout still leaves the report of what it finished
for r in models train models_compile; do
  [ ! -f "$RES/$r/models.json" ] && [ -f "$RES/$r/models.partial.json" ] && \
    cp "$RES/$r/models.partial.json" "$RES/$r/models.json"
done
for r in kernels kernels_compile; do
  [ ! -f "$RES/$r/kernels.json" ] && [ -f "$RES/$r/kernels.partial.json" ] && \
    cp "$RES/$r/kernels.partial.json" "$RES/$r/kernels.json"
done

# pack: summary.md + results.tar.gz + the JSON reports (<= 8 files in $OUT)
TOTAL=$(( $(date +%s) - T0 ))
SUM="$WORK/summary.md"
{
  echo "# tilefuse GPU check: $GPU, $DATE (${TOTAL}s of steps)"
  echo
  echo '```'; cat "$WORK/env.log" | head -40; echo '```'
  echo
  echo "| step | status | time | command |"; echo "|---|---|---|---|"
  awk -F'\t' '{printf "| %s | %s | %s | `%s` |\n", $1, $2, $3, $4}' "$STEPS"
  echo
  if [ -f "$WORK/pytest_cuda.log" ]; then
    echo "## pytest -m cuda"
    echo "$(grep -c ' PASSED' "$WORK/pytest_cuda.log") passed, $(grep -c ' FAILED' "$WORK/pytest_cuda.log") failed, $(grep -c ' SKIPPED' "$WORK/pytest_cuda.log") skipped, $(grep -c ' ERROR' "$WORK/pytest_cuda.log") errors (per-test lines)"
    echo '```'; grep -E ' (FAILED|ERROR)' "$WORK/pytest_cuda.log" | head -40
    for sh in 0 1 2; do
      echo "--- shard $sh:"; tail -n 20 "$WORK/pytest_cuda_$sh.log" 2>/dev/null
    done; echo '```'
  fi
  for r in kernels kernels_compile models train models_compile; do
    if ls "$RES/$r/"*.md > /dev/null 2>&1; then
      echo; echo "## bench $r"; cat "$RES/$r/"*.md
    elif ls "$RES/$r/"*.json > /dev/null 2>&1; then
      echo; echo "## bench $r: killed by its timeout; partial report in $r/"
    fi
  done
  echo
  echo "Unpack results.tar.gz at the repo root to get bench/results/$SLUG/$DATE/."
} > "$SUM" 2>&1
cp "$WORK"/*.log "$WORK/steps.tsv" "$SUM" "$RES/" 2>/dev/null
cp -r "$TILEFUSE_CACHE_DIR" "$RES/autotune_cache" 2>/dev/null
rm -rf "$RES/autotune_cache/ext"   # (the built autograd node: a binary, not a result)
tar -czf "$OUT/results.tar.gz" -C "$WORK" bench
cp "$SUM" "$OUT/summary.md"
[ -f "$RES/kernels/kernels.json" ] && cp "$RES/kernels/kernels.json" "$OUT/kernels.json"
[ -f "$RES/models/models.json" ] && cp "$RES/models/models.json" "$OUT/models.json"
[ -f "$RES/kernels_compile/kernels.json" ] && cp "$RES/kernels_compile/kernels.json" "$OUT/kernels_compile.json"
[ -f "$RES/train/models.json" ] && cp "$RES/train/models.json" "$OUT/train.json"
[ -f "$RES/models_compile/models.json" ] && cp "$RES/models_compile/models.json" "$OUT/models_compile.json"
[ -f "$RES/host/host.json" ] && cp "$RES/host/host.json" "$OUT/host.json"
rm -rf "$WORK"
echo "done in ${TOTAL}s; files in $OUT:"; ls -la "$OUT"
