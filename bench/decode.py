"""Decoding latency per new token: NSA over a KV cache (ours) vs dense SDPA over a KV cache, one process.

One attention layer's decode step for one new token per sequence, the cache already holding ``T`` tokens:

* ``sdpa_dense``   write the new k (rotated) and v into a preallocated cache, then
                   ``F.scaled_dot_product_attention`` of the new query over the ``T + 1`` cached keys (GQA via
                   ``enable_gqa``; flash/cuDNN/efficient backend).
* ``nsa_decode``   :meth:`NSACache.append` (write the new k, rotated, and v; compress the block it completes by
                   mean pooling of raw keys from the ring; branch-free, so one block is compressed every step,
                   the worst case), then :func:`nsa_flex.functional.nsa_decode`: compressed attention over the
                   cached compressed keys, scoring + top-n, attention over the selected blocks and the window,
                   gating; the attention in the fused Triton kernels (:mod:`nsa_flex.functional.fused_decode`).
* ``nsa_decode_gather``  the same step with ``use_kernel=False``: keys gathered into new tensors by torch ops.

Each runs eagerly and, as ``<method>_graph``, captured whole (cache writes included) in one CUDA graph and
replayed, which is how a server runs a decode step: launch and Python costs gone, the GPU work left. The graphs
capture the attention compiled by ``torch.compile`` (dense: the query's rotation and SDPA; NSA: ``nsa_decode``),
so that neither replays dozens of small unfused ops; the cache update stays eager. ``--no-compile`` skips the
graph variants. Inputs are random (bf16, NSA paper config l=32, d=16, l'=64, n=16, w=512, RoPE). Median of
CUDA-event timings after warm-up, for ``T`` in 8k/16k/32k/64k and batch 1 and 16. Writes
``bench/results/decode.json``.

``--smoke`` runs a tiny CPU version of the same code in seconds (the tests run it so the script cannot rot).

Usage: ``python -m bench.decode [--contexts 8192 16384 32768 65536] [--batches 1 16] [--configs paper small]``
"""

from __future__ import annotations

import argparse
from typing import Callable

import torch
import torch.nn.functional as torch_F

from nsa_flex import functional as F
from nsa_flex.cli import ArgParser, positive_arg
from nsa_flex.modules import NSACache

from .common import RESULTS, cpu_time, cuda_graphed, cuda_time, environment, profile_into, save
from .nsa import CONFIGS as NSA_CONFIGS
from .nsa import PAPER_NSA

CONFIGS = {name: NSA_CONFIGS[name] for name in ("paper", "small")}  # bench.nsa's two of issue 5
ROTARY_BASE = 10000.0


def make_state(B: int, T: int, heads: int, kv_heads: int, head_dim: int, cfg: dict, device, dtype, seed: int = 0):
    """An :class:`NSACache` of ``T`` random tokens (room for one more: keys rotated, the raw-key ring, the
    compressed keys of the raw ones) and one new token per sequence; the dense baseline reads its keys/values."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    L = T + 1
    l, d = cfg["compress_block_size"], cfg["compress_stride"]

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    cache = NSACache(B, kv_heads, head_dim, L, l, d, device=device, dtype=dtype, rotary_base=ROTARY_BASE)
    k, v = rand(B, kv_heads, T, head_dim), rand(B, kv_heads, T, head_dim)
    cache.store_prefill(k, v, F.mean_pool(k, l, d), F.mean_pool(v, l, d))
    cache.start(torch.full((B,), T, device=device))
    del k, v
    return dict(
        q=rand(B, heads, 1, head_dim), k_new=rand(B, kv_heads, 1, head_dim), v_new=rand(B, kv_heads, 1, head_dim),
        gates=torch.rand(B, heads, 1, 3, generator=gen).to(device=device, dtype=dtype), cache=cache,
        # The new token sits at position T. update_compressed is branch-free: it compresses one block per step
        # whether or not the token completes one, so the timing does not depend on T mod d.
        positions=cache.positions(1),
        length=T + 1,  # host-side, so the dense baseline slices the cache without a device sync
    )


STEPS = ("sdpa_dense", "nsa_decode", "nsa_decode_gather")  # the decode steps methods() times


def methods(cfg: dict, graphs: bool) -> dict[str, Callable[[dict], Callable[[], object]]]:
    """Each method makes, from a state, the step to time (a closure over the state)."""

    def dense_attend(q, k_cache, v_cache, positions, length):
        q = F.rotary_at(q, positions, ROTARY_BASE)
        k, v = k_cache[:, :, :length], v_cache[:, :, :length]  # all sequences have the same length here
        return torch_F.scaled_dot_product_attention(q, k, v, enable_gqa=q.shape[1] != k.shape[1])

    def dense_step(compiled=False):
        attend = torch.compile(dense_attend, dynamic=False) if compiled else dense_attend

        def step(s):
            c = s["cache"]
            F.write_cache(c.k, c.v, s["k_new"], s["v_new"], s["positions"], rotary_base=ROTARY_BASE)
            return attend(s["q"], c.k, c.v, s["positions"], s["length"])

        return step

    def nsa_step(use_kernel, compiled=False):
        decode = torch.compile(F.nsa_decode, dynamic=False) if compiled else F.nsa_decode

        def step(s):
            # The cache update stays eager: compiled, inductor functionalizes an in-place write into a graph
            # input by copying the whole cache (2 x 1.4 ms at 64k tokens, batch 16).
            c = s["cache"]
            c.append(s["k_new"], s["v_new"], s["positions"], "mean", "mean")
            return decode(s["q"], c.k, c.v, c.k_cmp, c.v_cmp, s["positions"], s["gates"], **cfg,
                          rotary_base=ROTARY_BASE, use_kernel=use_kernel)

        return step

    def steps(compiled: bool) -> dict:
        """The :data:`STEPS`, in that order."""
        return dict(zip(STEPS, (dense_step(compiled), nsa_step(None, compiled), nsa_step(False, compiled))))

    out = {name: (lambda step: lambda s: (lambda: step(s)))(step) for name, step in steps(False).items()}
    if graphs:
        # The graphs replay the attention compiled (inductor's fused kernels, not dozens of small ops: for dense,
        # the query's rotation; for NSA, the rotation's frequencies and the glue between its kernels)
        for name, step in steps(True).items():
            out[f"{name}_graph"] = (lambda step: lambda s: cuda_graphed(lambda: step(s)))(step)
    return out


def main(argv=None) -> dict:
    p = ArgParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", type=positive_arg, nargs="+", default=[8192, 16384, 32768, 65536],
                   help="tokens already in the cache")
    p.add_argument("--batches", type=positive_arg, nargs="+", default=[1, 16])
    p.add_argument("--configs", nargs="+", default=["paper", "small"], choices=sorted(CONFIGS))
    p.add_argument("--methods", nargs="+", default=None, choices=[f"{m}{g}" for m in STEPS for g in ("", "_graph")],
                   metavar="METHOD", help=f"a subset of {' '.join(STEPS)}, each also with the suffix _graph")
    p.add_argument("--no-compile", action="store_true", help="skip the CUDA-graph variants")
    p.add_argument("--repeats", type=positive_arg, default=50)
    p.add_argument("--profile", action="store_true",
                   help="also profile each method: its top kernels and kernel launches per step (in the JSON)")
    p.add_argument("--smoke", action="store_true", help="tiny CPU run of the same code (for CI)")
    p.add_argument("--out", default=str(RESULTS), help="directory for the JSON (default bench/results)")
    args = p.parse_args(argv)
    if not (args.smoke or torch.cuda.is_available()):
        p.error("bench.decode needs CUDA (use --smoke for the CPU check)")
    threads = torch.get_num_threads()
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args) -> dict:
    if args.smoke:
        torch.set_num_threads(1)  # tiny ops: extra intra-op threads only contend on a shared CI runner
        device, dtype = torch.device("cpu"), torch.float32
        contexts, batches = [95, 200], [1, 2]
        configs = {"tiny": dict(heads=4, kv_heads=1, head_dim=16)}
        cfg = dict(PAPER_NSA, compress_block_size=8, compress_stride=4, selection_block_size=16, num_selected=3,
                   window_size=32)
        timer = cpu_time
        graphs = False
    else:
        device, dtype = torch.device("cuda"), torch.bfloat16
        contexts, batches = args.contexts, args.batches
        configs = {name: CONFIGS[name] for name in args.configs}
        cfg = PAPER_NSA
        timer = lambda fn: cuda_time(fn, 5, args.repeats)  # noqa: E731
        graphs = not args.no_compile
    env = environment()
    print(env, flush=True)
    rows = []
    payload = {"env": env, "nsa_config": cfg, "rows": rows, "smoke": args.smoke,
               "note": "one attention layer, one new token per sequence, median ms per decode step"}
    result = "decode_smoke" if args.smoke else "decode"
    path = save(result, payload, args.out)  # a bad --out fails now, not after the run; rewritten after every row
    for config, shape in configs.items():
        for B in batches:
            for T in contexts:
                # Each shape compiles nsa_decode afresh (dynamic=False); past dynamo's recompile limit (8 per
                # function) a compiled call silently runs eagerly, which had made later rows measure eager ops.
                torch._dynamo.reset()
                for name, make in methods(cfg, graphs).items():
                    if args.methods and name not in args.methods:
                        continue
                    row = dict(config=config, context=T, batch=B, method=name, **shape)
                    state = None
                    try:
                        state = make_state(B, T, **shape, cfg=cfg, device=device, dtype=dtype)
                        with torch.no_grad():
                            fn = make(state)
                            row["ms_per_token"] = timer(fn)
                            if args.profile:
                                profile_into(row, f"{name}, B={B}, T={T}", fn)
                    except Exception as err:  # noqa: BLE001 - a failing method is reported, not fatal
                        row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
                    print(row, flush=True)
                    rows.append(row)
                    save(result, payload, args.out)
                    state = None  # its caches freed before the next shape's
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
