"""NSA (ours) vs dense causal SDPA: forward and forward+backward time and peak memory, one process, same inputs.

Usage: ``python -m bench.nsa [--seq-lens 8192 16384] [--heads 64 --kv-heads 4 --head-dim 128]``
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as torch_F

from nsa_flex import functional as F

from .common import cuda_time, environment, peak_memory, save

PAPER = dict(compress_block_size=32, compress_stride=16, selection_block_size=64, num_selected=16, window_size=512)


def inputs(T: int, heads: int, kv_heads: int, head_dim: int, requires_grad: bool):
    gen = torch.Generator(device="cuda").manual_seed(0)
    make = lambda h, d: torch.randn(1, h, T, d, device="cuda", dtype=torch.bfloat16, generator=gen)  # noqa: E731
    q, k, v = make(heads, head_dim), make(kv_heads, head_dim), make(kv_heads, head_dim)
    gates = torch.rand(1, heads, T, 3, device="cuda", dtype=torch.bfloat16, generator=gen)
    return [x.requires_grad_(requires_grad) for x in (q, k, v, gates)]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seq-lens", type=int, nargs="+", default=[8192, 16384])
    p.add_argument("--heads", type=int, default=64)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    env = environment()
    print(env)
    rows = []
    for T in args.seq_lens:
        q, k, v, g = inputs(T, args.heads, args.kv_heads, args.head_dim, True)

        def ours():
            return F.nsa_attention(q, k, v, g, **PAPER)

        def dense():
            return torch_F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

        for name, fn in (("nsa_flex", ours), ("sdpa_causal", dense)):
            with torch.no_grad():
                fwd = cuda_time(fn, 2, args.repeats)
                fwd_mem = peak_memory(fn)

            def step():
                fn().float().pow(2).mean().backward()

            both = cuda_time(step, 2, args.repeats)
            both_mem = peak_memory(step)
            row = dict(T=T, method=name, fwd_ms=fwd, fwd_bwd_ms=both, fwd_peak_bytes=fwd_mem, fwd_bwd_peak_bytes=both_mem)
            print(row, flush=True)
            rows.append(row)
    save("nsa", {"env": env, "config": PAPER, "heads": args.heads, "kv_heads": args.kv_heads, "rows": rows})


if __name__ == "__main__":
    main()
