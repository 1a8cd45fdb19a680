#!/usr/bin/env bash
# One-shot GPU check for a lent H200 (no internet; the image's python3 has torch, triton, transformers, peft).
#   1. the op tests on CUDA in parallel pytest processes (Triton kernels compiled for real, bf16
#      included), every autotune config of every kernel forced in turn (tests/test_gpu_tiles.py,
#      bf16; the TMA configs on sm_90+ among them), the device_map tests (a model
#      split over cuda:0 and cpu, or two GPUs) and torch.compile of a model whose CordaLinear
#      layers run the kernels;
#   2. bench/gpu_bench.py: covariance kernel, fused adapter linear, collect_cov end to end, then
#      our kernels by default, with pointer loads only (CORDA_KERNELS_TMA=0) and with TMA wherever a
#      layout allows (=1), which is how the default's exceptions (dx's GEMM, small updates) get re-timed.
# Budget: under 9.5 minutes in all, to fit one 10-minute device call (tests capped at 110 s; the bench
# sections at 80 + 60 + 60 + 40 + 65 s, and 50 + 80 s for the TMA settings, each in its own process
# so a CUDA fault or a hang loses only that one). On the H200 of 2026-11-30 they took 18-48 s each
# with pointer loads only, and 55 s for one rank autotuning pointer and TMA configs for both GEMMs
# (what the b*_tma parts do). Section a has more room since TMA became the default for large updates
# (about 82 configs to tune, from 56; ~0.5 s each); b128 reuses b64's compiled kernels (18 s then).
# Usage, from anywhere:  bash bench/gpu_check.sh [extra gpu_bench.py args]
# A shorter second call runs a subset: GPU_CHECK_TESTS="tiles_tma" (test groups, "" for none),
# GPU_CHECK_BENCH="b64_tma:150" (bench parts, name:seconds), GPU_CHECK_TEST_LIMIT=100.
# Three files go to $OUT when set (the device tool's folder, which returns only a few files), else to
# ./out/: gpu_pytest.log (every pytest process's log, with its exit code), gpu_bench.log and
# RESULTS-gpu.md, the dated report (autotuner picks included), ready to paste into bench/RESULTS.md.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
LOG_DIR=${OUT:-out}
mkdir -p "$LOG_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET CORDA_KERNELS_BACKEND CORDA_KERNELS_TMA  # the rows say which setting they ran

start=$(date +%s)
mkdir -p "$LOG_DIR"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true; } | tee "$LOG_DIR/gpu_bench.log"
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())"
# Without CUDA every test below would pass through the interpreter and the bench would measure nothing:
# a run that reads as green. Stop here instead.
if ! "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
    echo "FATAL: torch sees no CUDA device; nothing on this machine can check the GPU paths"
    exit 2
fi

echo "== pytest (CUDA) =="
# Correctness only: one small config per kernel (CORDA_KERNELS_AUTOTUNE=0), so the run compiles each
# specialization once instead of autotuning every test shape. The bench below autotunes for real,
# and its rows check the autotuned default path (TMA configs included) against float64 or PEFT.
# Kernel compiles are CPU-bound and single-threaded: eight pytest processes share the host's cores
# (xdist is not assumed to be installed), each capped at $TEST_LIMIT s (the slowest group took 75 s
# on the H200 of 2026-11-30).
WORK=$(mktemp -d)
TEST_LIMIT=${GPU_CHECK_TEST_LIMIT:-110}
run_tests() {  # name, pytest args...
    local name=$1; shift
    CORDA_KERNELS_AUTOTUNE=0 timeout -k 10 "$TEST_LIMIT" "$PY" -m pytest -q -p no:cacheprovider "$@" > "$WORK/$name.log" 2>&1
    echo $? > "$WORK/$name.rc"
}
# Groups by node id, not by -k: -k matches keywords beyond test names, and on the H200 of
# 2026-11-30 `-k tma` took 74 of the 75 tile tests (21 of 122 on a CPU). A test in
# tests/test_gpu_bench_smoke.py checks that these groups cover every test of test_gpu_tiles.py once.
T=tests/test_gpu_tiles.py
TILES_GEMM="$T::test_tile_tables_are_what_the_autotuner_would_use $T::test_autotune_keys_name_kernel_arguments
    $T::test_adapter_gemm_every_tile $T::test_gemm_prune_drops_tma_configs_without_descriptors"
TILES_COV_DY="$T::test_covariance_every_tile $T::test_dy_kernel_every_tile
    $T::test_triangle_walk_covers_each_upper_entry_once $T::test_covariance_prune_drops_tma_configs_without_descriptors"
TILES_TMA="$T::test_covariance_every_tma_tile $T::test_covariance_descriptors_only_for_plain_rows
    $T::test_adapter_gemm_every_tma_tile $T::test_tma_descriptors_only_where_the_layout_allows
    $T::test_tma_default_by_device_and_setting $T::test_covariance_tma_threshold_sits_between_the_measured_updates"
# GPU_CHECK_TESTS and GPU_CHECK_BENCH pick a subset (names as below), for a second, shorter call.
GROUPS_RUN=${GPU_CHECK_TESTS-"covariance lora_a lora_b device_map tiles_gemm tiles_cov_dy tiles_tma compile"}
for name in $GROUPS_RUN; do
    case $name in
        covariance) run_tests "$name" tests/test_ops_covariance.py & ;;
        lora_a) run_tests "$name" tests/test_ops_lora.py -k "bf16 or dropout or forward_and_grads" & ;;
        lora_b) run_tests "$name" tests/test_ops_lora.py -k "not (bf16 or dropout or forward_and_grads)" & ;;
        device_map) run_tests "$name" tests/test_device_map.py & ;;
        tiles_gemm) run_tests "$name" $TILES_GEMM & ;;
        tiles_cov_dy) run_tests "$name" $TILES_COV_DY & ;;
        tiles_tma) run_tests "$name" $TILES_TMA & ;;
        compile) run_tests "$name" tests/test_compile_cuda.py & ;;
        *) echo "unknown test group: $name"; echo 98 > "$WORK/$name.rc" ;;
    esac
done
wait
test_rc=0
summary=""
: > "$LOG_DIR/gpu_pytest.log"
for name in $GROUPS_RUN; do
    rc=$(cat "$WORK/$name.rc" 2>/dev/null || echo 99)
    { echo "===== pytest $name: exit $rc ====="; cat "$WORK/$name.log" 2>/dev/null; echo; } >> "$LOG_DIR/gpu_pytest.log"
    line="-- pytest $name: exit $rc; $(tail -n 1 "$WORK/$name.log" 2>/dev/null)"
    fails=$(grep -E "^(FAILED|ERROR)" "$WORK/$name.log" 2>/dev/null | head -20)
    summary+="$line"$'\n'${fails:+"$fails"$'\n'}
    [ "$rc" -eq 0 ] || test_rc=1
done
printf "%s" "$summary"
echo "pytest exit code: $test_rc ($(( $(date +%s) - start )) s so far)"

echo "== gpu_bench.py =="
bench_rc=0
rm -f "$LOG_DIR/RESULTS-gpu.md"
# The adapter section runs one rank per process: each writes its table when done, so a timeout in
# one (autotuning compiles 9 pointer configs per rank tile for dx's GEMM, 6 TMA ones more for the
# forward's) loses only that rank.
# Compiled kernels are cached on disk, so a later process reuses what an earlier one built.
# The *_tma parts time our kernels by default and with CORDA_KERNELS_TMA=0 and =1, interleaved.
PARTS=${GPU_CHECK_BENCH-"a:80 b16:60 b64:60 b128:40 c:65 a_tma:50 b16_tma:80"}
for part in $PARTS; do
    name=${part%%:*}; limit=${part##*:}
    [[ $part == *:* ]] || limit=60
    r=${name#b}; r=${r%_tma}  # the rank of b16 or b64_tma; empty for b and b_tma (every rank)
    case $name in
        a_tma) sec=a; extra=(--tma only) ;;
        b*_tma) sec=b; extra=(--tma only ${r:+--lora-ranks "$r"}) ;;
        b*) sec=b; extra=(--tma off ${r:+--lora-ranks "$r"}) ;;
        *) sec=$name; extra=(--tma off) ;;
    esac
    # The user's arguments first: the per-process section and rank come last and win.
    timeout -k 10 "$limit" "$PY" bench/gpu_bench.py "$@" --sections "$sec" ${extra[@]+"${extra[@]}"} \
        --markdown "$LOG_DIR/RESULTS-gpu.md" --append 2>&1 \
        | tee -a "$LOG_DIR/gpu_bench.log"
    rc=${PIPESTATUS[0]}
    if [ "$rc" -ne 0 ]; then
        bench_rc=1
        if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
            printf '\n(section %s: killed after its %s s limit)\n\n' "$name" "$limit" >> "$LOG_DIR/RESULTS-gpu.md"
        fi
    fi
    echo "gpu_bench section $name: exit $rc ($(( $(date +%s) - start )) s so far)"
done
rm -rf "$WORK"
# Printed again last, so the summary is inside the tail of the output that comes back.
echo "== summary =="
printf "%s" "$summary"
echo "pytest exit code: $test_rc; gpu_bench exit code: $bench_rc; total $(( $(date +%s) - start )) s"
[ "$test_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
