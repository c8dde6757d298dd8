#!/usr/bin/env bash
# What only an accelerator can measure, in one call (a lent GPU's time is short): decode
# throughput against transformers at the issue's 40M shape and at Qwen2.5-1.5B's (and paged at
# batch 256, through JAX's Pallas paged kernel), STEER's schedules at real step lengths and
# Qwen2.5-Math 1.5B/7B shapes (benchmarks/scale.py), the mixture fit
# against scikit-learn, and the HF-equivalence tests run on the accelerator instead of the CPU.
# Uses the machine's own jax/torch/transformers (its Python, not this repo's venv); wheels for
# anything missing may sit in .whl/. Logs go to $OUT (or a temporary folder).
#
#     bash benchmarks/accelerator.sh [STEP ...]     (default: every step but demo and profile)
#
# `demo` (only when named) runs the embedded STEER demo end to end on the accelerator, the whole
# routing loop on device; a session with device time to spare should run it once. `profile` (only
# when named) lists a 1.5B bfloat16 decode step op by op (decode.py --profile); its trace reading
# was written against XLA's CPU traces and has not yet run on a GPU.
set -u
ONLY=" $* "
OUT=${OUT:-$(mktemp -d)}
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
        .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
# torch shares the GPU with JAX in the decode benchmark: JAX must not take 75% of it up front.
export XLA_PYTHON_CLIENT_PREALLOCATE=false TOKENIZERS_PARALLELISM=false

step() {  # step NAME SECONDS CMD...: run with a time limit, log to $OUT/NAME.log, print the tail
    local name=$1 limit=$2; shift 2
    if [ "$ONLY" = "  " ]; then case $name in demo|profile) return 0 ;; esac
    else [[ "$ONLY" == *" $name "* ]] || return 0; fi
    echo "=== $name ($(date -u +%T))"
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    echo "rc=$?"
    # A profile's table comes last and runs to ~30 lines; other steps end with their figures.
    grep -v "Writing model shards\|Loading weights\|it/s\]" "$OUT/$name.log" \
        | tail -n "$([ "$name" = profile ] && echo 32 || echo 14)"
}

date -u
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
python3 -c "import jax, torch, transformers; print('jax', jax.__version__, jax.devices(), \
'| torch', torch.__version__, '| transformers', transformers.__version__)"

step decode_40m_f32 110 python3 benchmarks/decode.py
step decode_40m_bf16 80 python3 benchmarks/decode.py --dtype bfloat16
step decode_1.5b_bf16 180 python3 benchmarks/decode.py --dtype bfloat16 \
    --shape Qwen2.5-1.5B-Instruct --batch 64 --new 128
step decode_1.5b_f32 150 python3 benchmarks/decode.py \
    --shape Qwen2.5-1.5B-Instruct --batch 64 --new 128
# Paged decode at the issue's scale: 64-token pages read by JAX's Pallas paged kernel, beside one
# page a row (the old dense layout, on the XLA path) in the same run.
step decode_1.5b_bf16_paged_b256 240 python3 benchmarks/decode.py --dtype bfloat16 \
    --shape Qwen2.5-1.5B-Instruct --batch 256 --new 128 --page-size 64
# The scale workload at Qwen2.5-Math 1.5B/7B shapes (random weights that write steps of the stated
# length law, bfloat16), batch 256: STEER rounds and continuous against one unbarriered generate
# of the 7B. Where a step costs about the same for 70 rows as for 256, iterations are the clock.
step scale_math_b256 420 python3 benchmarks/scale.py --shape Qwen2.5-Math-1.5B/7B --traces 256 \
    --repeats 1 --chunk 32 --only large_only_rounds,steer_rounds,steer_continuous
step gmm 60 python3 benchmarks/gmm.py --repeats 10
# The tests pin JAX to the CPU unless JAX_PLATFORMS says otherwise.
step tests_gpu 150 env JAX_PLATFORMS=cuda python3 -m pytest -q -p no:cacheprovider \
    tests/test_modeling.py tests/test_decoding.py tests/test_gmm.py tests/test_paged_attention.py \
    tests/test_paging.py
step demo 300 python3 -m steer_jax.cli demo --config configs/demo.yaml --out /tmp/steer-demo
step profile 240 python3 benchmarks/decode.py --dtype bfloat16 --shape Qwen2.5-1.5B-Instruct \
    --batch 64 --new 128 --repeats 1 --profile
