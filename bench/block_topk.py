"""Block scoring + top-n: the fused Triton kernel (``block_topk``) against ``select_blocks``' unfused tiles.

Same inputs (paper configuration by default), same process: CUDA-event medians, peak memory, and how many
tokens chose the same blocks. Usage: ``python -m bench.block_topk [--seq-lens 16384 65536]``
"""

from __future__ import annotations

import argparse

import torch

from nsa_flex import functional as F
from nsa_flex import testing
from nsa_flex.functional import block_topk

from .common import RESULTS, cuda_time, environment, peak_memory, save


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seq-lens", type=int, nargs="+", default=[16384, 65536])
    p.add_argument("--heads", type=int, default=64)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--inputs", nargs="+", default=["random", "structured"], choices=["random", "structured"])
    p.add_argument("--no-unfused", action="store_true", help="skip the unfused tiles (slow at 64k)")
    p.add_argument("--out", default=str(RESULTS), help="directory for block_topk.json (default bench/results)")
    args = p.parse_args(argv)
    env = environment()
    print(env, flush=True)
    rows = []
    payload = {"env": env, "rows": rows}
    cfg = (32, 16, 64, 16, 1, 2)
    for T in args.seq_lens:
        for kind in args.inputs:
            q, k, v, _ = testing.nsa_inputs(T, args.heads, args.kv_heads, args.head_dim, kind, "cuda", torch.bfloat16)
            k_cmp, v_cmp = F.mean_pool(k, 32, 16), F.mean_pool(v, 32, 16)
            _, lse = F.compressed_attention(q, k_cmp, v_cmp, 32, 16, return_lse=True)
            results = {}
            fn = lambda: F.select_blocks(q, k_cmp, *cfg, lse=lse)  # noqa: E731
            results["fused"] = (fn(), cuda_time(fn), peak_memory(fn))
            if not args.no_unfused:
                supported, block_topk.supported = block_topk.supported, lambda *a: False
                fn = lambda: F.select_blocks(q, k_cmp, *cfg, lse=lse)  # noqa: E731
                results["unfused"] = (fn(), cuda_time(fn), peak_memory(fn))
                block_topk.supported = supported
            first = next(iter(results.values()))[0]
            for name, (idx, ms, mem) in results.items():
                row = {"T": T, "inputs": kind, "method": name, "ms": ms, "peak_MiB": mem / 2**20,
                       "same_as_first": (idx == first).all(-1).float().mean().item()}
                rows.append(row)
                print(row, flush=True)
            save("block_topk", payload, args.out)


if __name__ == "__main__":
    main()
