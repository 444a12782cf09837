#!/usr/bin/env bash
# The GPU measurements of a device session, one phase per device call (each fits the tool's 10-minute limit).
# Usage on the device machine, from the repo root:  bash bench/gpu_session.sh PHASE [ARGS]
#   tests    the gpu-marked tests and the Triton kernel tests (twelve processes side by side; compilation is
#            CPU-bound), ~8 min (nineteenth session: 448 s, tests/functional alone 432 s);
#            ARGS: pytest selections to run instead, one process each ("tests/x.py -k name" "tests/y.py");
#            TEST_TIMEOUT (seconds, default 480) bounds each (tests/functional/test_gpu.py alone did not finish
#            in 300 s: give its six fast_path cases their own processes, about 140 s for each 8192 one)
#   train    examples/train_lm.py (nsa, dense, window; context 4096, ~21M tokens each) and examples/needle.py,
#            all side by side on the one GPU: their losses and accuracies are the results, not their speed;
#            then examples/generate.py with the trained NSA checkpoint; ~9 min
#   kernels  bench.nsa (64k then 16k; ours vs SDPA, flex causal, fla; memory, stages; 64k alone with both
#            kinds of input took 250 s on a warm H100, 16k about 130 s; on a fresh machine the tenth
#            session's call only got through 64k random and one 16k row: split it with SEQ_LENS and INPUTS;
#            in the eleventh, 64k random with METHODS="sdpa_causal nsa_flex fla_nsa" and PROFILE=--profile took
#            385 s on a fresh machine, flex_causal added would not fit; in the twelfth, 64k random and structured
#            with those three methods and --profile took 426 s on a fresh machine, and SEQ_LENS="8192 16384
#            32768" INPUTS=random METHODS="sdpa_causal nsa_flex" 227 s on a warm one; in the thirteenth, 64k
#            random with all four methods (no --profile) 566 s on a fresh machine (flex_causal's compile and
#            autotune are most of it: run it alone with NSA_TIMEOUT=560), and CONFIGS=small INPUTS=random
#            with three methods about 110 s warm; in the fourteenth, all four at 64k random 527 s on a warm
#            machine, then 64k structured with three methods and --profile 66 s: the compiled kernels are
#            cached on the machine while it stays held; in the fifteenth, all four at 64k random 242 s on a
#            machine that had compiled our step, SEQ_LENS="8192 16384 32768" INPUTS=random METHODS="sdpa_causal
#            nsa_flex" 257 s, and a fresh machine's first 64k NSA step compiles for about 190 s; in the
#            sixteenth, all four at 64k random 379 s on a machine that had compiled our step, then structured
#            with three methods and --profile plus CONFIGS=small with three methods 156 s, and 8k-32k with
#            two methods 240 s on a fresh machine; in the seventeenth, all four at 64k random 363 s warm, then
#            structured (three methods, --profile), small (three) and 8k-32k (two) in one call 304 s; in the
#            eighteenth, all four at 64k random 353 s on a machine that had run our step, the other three 291 s;
#            in the nineteenth, all four at 64k random 400 s on a machine that had run only kernel prototypes)
#   scoring  bench.block_topk (fused vs unfused block scoring) and bench.block_mask (selection BlockMask build)
#   lm       bench.train_lm (LM training tokens/s; 4k+16k fit one call, 32k needs a second: LM_CONTEXTS) and
#            bench.train_toy (compiled module, T=8192; TOY_TIMEOUT=0 skips it)
#   memory   bench.peak_memory (the tensors alive at the peak of SDPA's and our fwd+bwd step; SEQ_LEN)
#   decode   bench.decode (per-token latency at 8k-64k, batch 16 and 1, with profiles; ~4.5 min)
# Timed phases run alone on the GPU; their JSON is written after every row, so a phase cut short keeps what it
# measured. Compilation dominates: every new shape compiles its own kernels (about a minute for NSA fwd+bwd).
# tests and train write under /tmp/gpu_session and pack it into one ${OUT:-bench/results}/PHASE.tar.gz (the
# device tool brings back at most 8 files); the timed phases write their few files straight to OUT. Tails of
# the logs go to stdout. tests and train (not timed) can share a call:
#   bash bench/gpu_session.sh tests > /tmp/tests.out 2>&1 & bash bench/gpu_session.sh train; wait
# Wheels the GPU image lacks travel in the git-ignored .whl/ (name it in the device tool's `carry`); make them
# here with: python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#   --platform manylinux2014_x86_64 -d .whl fla-core jaxtyping wadler_lindig hypothesis sortedcontainers attrs
# and cudnn-frontend (the window branch on cuDNN; without it the window runs on FlexAttention), manylinux_2_27:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#   --platform manylinux_2_27_x86_64 -d .whl nvidia-cudnn-frontend==1.16.0
set -uo pipefail
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TQDM_MININTERVAL=30
phase=${1:-}
dest=${OUT:-bench/results}
out=/tmp/gpu_session/$phase
mkdir -p /tmp/gpu_session
case "$phase" in kernels|scoring|lm|decode|memory) out=$dest ;; esac  # files land there one by one: a cut call returns them
mkdir -p "$out" "$dest"
if ls .whl/*.whl >/dev/null 2>&1; then
    # phases started side by side install once (flock), the later ones only wait for it
    flock /tmp/site.lock bash -c '[ -e /tmp/site/.done ] || { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && touch /tmp/site/.done; }'
    export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
python3 -c "import hypothesis, jaxtyping" 2>/dev/null || echo "WARNING: hypothesis/jaxtyping missing: carry .whl (see top of this file)"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} 2>&1 | tee /tmp/gpu_session/env.log
quiet() { grep -v -e DEBUG -e '^W[0-9]' ; }

phase_tests() {  # optional arguments: pytest selections, each run as its own process, instead of the whole suite
    # SIGINT at the time limit: pytest then still prints the failures so far (a plain kill loses them).
    local pytest="python3 -m pytest -m gpu -q -p no:cacheprovider --durations=8 -rfE"
    local timeout="timeout -s INT -k 20 ${TEST_TIMEOUT:-480}"
    local shards=("$@") i=0
    # the 13 mask generators alone took over 8 minutes in one process: two shards of them
    local first="generators and (causal or sliding or chunked or dilated or global or prefix or document)"
    # The Triton kernel tests that are not gpu-marked (the triton_device ones: Hypothesis against float64,
    # interpreted in CPU CI) run natively here; the later -m overrides the first.
    local kernels="tests/functional/test_fused_decode.py tests/functional/test_cache_update.py \
tests/functional/test_block_topk.py tests/functional/test_selected_kernel.py -m 'not gpu'"
    # tests/functional in one process needed 515 s on a fresh machine (twentieth session): test_gpu.py (the
    # fast-path cases, about 30 s each after compiling) gets its own, split by length since the
    # twenty-ninth session, when it and the masks' other GPU tests (the gradient checks added) each ran past
    # 480 s; the gradient checks get two processes of their own, one starting with the (16, 16) blocks' (180 s
    # on a fresh H100, most of it compiling create_block_mask, which small masks no longer do: 45 s since). With
    # small BlockMasks built eagerly the masks' shards took 45-145 s, test_gpu.py's 44-70 s (twenty-ninth).
    local masks="tests/masks -k 'not generators and"
    local fast="tests/functional/test_gpu.py -k"
    [ $# -gt 0 ] || shards=("tests/masks -k '$first'" "tests/masks -k 'generators and not ($first)'"
                            "$masks per_block_size and not 16x16'"
                            "$masks (16x16 or gradient) and not (per_block_size and not 16x16)'" "$masks not gradient'"
                            "tests/functional --ignore=tests/functional/test_gpu.py"
                            "$fast 'fast_path and 1000'" "$fast 'fast_path and 4096'"
                            "$fast 'fast_path and 8192'" "$fast 'not fast_path'" "tests/modules tests/test_*.py" "$kernels")
    for shard in "${shards[@]}"; do
        i=$((i + 1))
        eval "$timeout $pytest $shard" 2>&1 | quiet > "$out/tests_$i.log" &
    done
    wait
    tail -n 25 "$out"/tests_*.log
}

phase_train() {
    # Same model for every attention type; NSA's compressor is "linear" so that its parameter count stays
    # within a few percent of dense (the paper's MLP compressor would triple this model).
    local runs=/tmp/runs nsa="--window 128 --compress-mlp linear"
    local lm="python3 examples/train_lm.py --context 4096 --batch 8 --steps 640 --warmup 50 --dim 512 --depth 6
        --heads 8 --kv-heads 2 $nsa --eval-every 80 --eval-batches 16 --ckpt-every 0 --compile --time-limit 420
        --no-progress"
    for attn in nsa dense window; do
        timeout 500 $lm --attn $attn --out $runs/lm_$attn 2>&1 | quiet > "$out/train_$attn.log" &
    done
    local needle="python3 examples/needle.py --context 1024 --steps 3000 --batch 32 $nsa --no-progress"
    timeout 500 $needle --attn nsa --out $runs/needle_nsa 2>&1 | quiet > "$out/needle_nsa.log" &
    timeout 500 $needle --attn dense window --out $runs/needle_dense_window 2>&1 | quiet > "$out/needle_dw.log" &
    wait
    python3 examples/train_lm.py --compare $runs/lm_nsa $runs/lm_dense $runs/lm_window --out $runs/compare \
        2>&1 | tee "$out/compare.log"
    # the trained NSA model through the KV cache (prefill + token-by-token decoding)
    timeout 60 python3 examples/generate.py --checkpoint $runs/lm_nsa/checkpoint.pt --device cuda \
        --prompt "import " --prompt "def main(argv=None):" --max-new-tokens 200 --temperature 0.8 --top-k 40 \
        2>&1 | quiet | tee "$out/generate.log"
    tail -n 6 "$out"/train_*.log "$out"/needle_*.log
    cp -r --no-preserve=mode $runs "$out/" && find "$out" -name '*.pt' -delete
}

phase_kernels() {  # environment overrides: SEQ_LENS, CONFIGS, INPUTS, METHODS, PROFILE (--profile or empty), NSA_TIMEOUT
    timeout ${NSA_TIMEOUT:-560} python3 -m bench.nsa --seq-lens ${SEQ_LENS:-65536 16384} --configs ${CONFIGS:-paper} \
        --inputs ${INPUTS:-random structured} --methods ${METHODS:-sdpa_causal nsa_flex fla_nsa flex_causal} ${PROFILE-} \
        --out "$out" 2>&1 | quiet | tee "$out/nsa.log"
}

phase_scoring() {
    timeout 150 python3 -m bench.block_topk --seq-lens 4096 16384 65536 --out "$out" 2>&1 | quiet \
        | tee "$out/block_topk.log"
    timeout 240 python3 -m bench.block_mask --seq-lens 16384 65536 --with-dense --out "$out" 2>&1 | quiet \
        | tee "$out/block_mask.log"
}

phase_lm() {  # environment overrides: TOY_TIMEOUT (0: skip), LM_TIMEOUT, LM_CONTEXTS
    [ "${TOY_TIMEOUT:-150}" = 0 ] || timeout ${TOY_TIMEOUT:-150} python3 -m bench.train_toy --seq-len 8192 \
        --steps 40 --compile --out "$out" 2>&1 | quiet | tee "$out/train_toy.log"
    timeout ${LM_TIMEOUT:-390} python3 -m bench.train_lm --attn nsa dense --contexts ${LM_CONTEXTS:-4096 16384} \
        --repeats 5 --out "$out" 2>&1 | quiet | tee "$out/train_lm.log"
}

phase_memory() {  # environment override: SEQ_LEN (default 65536)
    timeout 300 python3 -m bench.peak_memory --seq-len ${SEQ_LEN:-65536} --out "$out" 2>&1 | quiet \
        | tee "$out/peak_memory.log"
}

phase_decode() {  # the four contexts at batch 16 and 1 with profiles took 261 s on an H100
    timeout 540 python3 -m bench.decode --contexts 65536 32768 16384 8192 --batches 16 1 --configs paper \
        --repeats 20 --profile --out "$out" 2>&1 | quiet | tee "$out/decode.log"
}

case "$phase" in
    tests|train|kernels|scoring|lm|decode|memory) shift; "phase_$phase" "$@" ;;
    *) echo "usage: bash bench/gpu_session.sh {tests|train|kernels|scoring|lm|decode|memory} [ARGS]" >&2; exit 2 ;;
esac
[ "$out" = "$dest" ] || tar czf "$dest/$phase.tar.gz" -C /tmp/gpu_session "$phase"
