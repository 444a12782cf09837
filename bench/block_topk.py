"""Block scoring + top-n: the fused Triton kernel (``block_topk``) against ``select_blocks``' unfused tiles.

Same inputs (paper configuration by default), same process: CUDA-event medians, peak memory, and the share
of tokens that chose the same blocks as the fused kernel. ``--smoke`` times the unfused path on a tiny CPU
problem (CI runs it so the script cannot rot; the kernel itself needs CUDA).

Usage: ``python -m bench.block_topk [--seq-lens 16384 65536]``
"""

from __future__ import annotations

import torch

from nsa_flex import functional as F
from nsa_flex import testing
from nsa_flex.cli import ArgParser, positive_arg
from nsa_flex.functional import block_topk

from .common import RESULTS, cpu_time, cuda_time, environment, peak_memory, save
from .nsa import PAPER_NSA

# l, d, l', n, initial, local: the paper's, as bench.nsa runs it
CONFIG = tuple(PAPER_NSA[key] for key in ("compress_block_size", "compress_stride", "selection_block_size",
                                          "num_selected", "num_initial", "num_local"))


def unfused(fn):
    """Run ``fn`` with the kernel switched off, so select_blocks takes its chunked torch path."""
    supported, block_topk.supported = block_topk.supported, lambda *args: False
    try:
        return fn()
    finally:
        block_topk.supported = supported


def main(argv=None) -> dict:
    p = ArgParser(description=__doc__)
    p.add_argument("--seq-lens", type=positive_arg, nargs="+", default=[16384, 65536])
    p.add_argument("--heads", type=positive_arg, default=64)
    p.add_argument("--kv-heads", type=positive_arg, default=4)
    p.add_argument("--head-dim", type=positive_arg, default=128)
    p.add_argument("--inputs", nargs="+", default=["random", "structured"], choices=["random", "structured"])
    p.add_argument("--no-unfused", action="store_true", help="skip the unfused tiles (190 ms a call at 64k)")
    p.add_argument("--smoke", action="store_true", help="tiny CPU run of the unfused path (for CI)")
    p.add_argument("--out", default=str(RESULTS), help="directory for block_topk.json (default bench/results)")
    args = p.parse_args(argv)
    if args.smoke:
        device, dtype, timer = "cpu", torch.float32, cpu_time
        args.seq_lens, args.heads, args.kv_heads, args.head_dim = [256], 4, 1, 16
    elif not torch.cuda.is_available():
        p.error("bench.block_topk needs CUDA (use --smoke for the CPU check)")
    else:
        device, dtype, timer = "cuda", torch.bfloat16, cuda_time
    env = environment()
    print(env, flush=True)
    rows = []
    payload = {"env": env, "config": dict(zip(("l", "d", "l_sel", "n", "initial", "local"), CONFIG)), "rows": rows}
    name = "block_topk_smoke" if args.smoke else "block_topk"
    for T in args.seq_lens:
        for kind in args.inputs:
            q, k, v, _ = testing.nsa_inputs(T, args.heads, args.kv_heads, args.head_dim, kind, device, dtype)
            l, d = CONFIG[:2]
            k_cmp, v_cmp = F.mean_pool(k, l, d), F.mean_pool(v, l, d)
            _, lse = F.compressed_attention(q, k_cmp, v_cmp, l, d, return_lse=True)
            select = lambda: F.select_blocks(q, k_cmp, *CONFIG, lse=lse)  # noqa: E731
            methods = {}
            if not args.smoke:
                methods["fused"] = select
            if args.smoke or not args.no_unfused:
                methods["unfused"] = lambda: unfused(select)  # noqa: E731
            fused = None
            for method, fn in methods.items():
                idx = fn()
                fused = idx if method == "fused" else fused
                row = {"T": T, "inputs": kind, "method": method, "ms": timer(fn)}
                if fused is not None:  # the share of tokens whose blocks equal the kernel's
                    row["same_as_fused"] = (idx == fused).all(-1).float().mean().item()
                if device == "cuda":
                    row["peak_MiB"] = peak_memory(fn) / 2**20
                rows.append(row)
                print(row, flush=True)
            save(name, payload, args.out)
    return payload


if __name__ == "__main__":
    main()
