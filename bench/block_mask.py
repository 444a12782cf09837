"""Time and memory of ``masks.block_mask_from_indices`` (O(T*n)) against ``create_block_mask`` (T x T mask_mod).

Usage: ``python -m bench.block_mask [--seq-lens 8192 65536] [--num-selected 16]``
"""

from __future__ import annotations

import argparse

import torch

from nsa_flex import masks

from .common import RESULTS, cuda_time, environment, peak_memory, save


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seq-lens", type=int, nargs="+", default=[8192, 16384, 32768, 65536])
    p.add_argument("--num-selected", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--with-dense", action="store_true",
                   help="also time create_block_mask(fine_selection) at T <= 16384 (compiles for a while)")
    p.add_argument("--out", default=str(RESULTS), help="directory for block_mask.json (default bench/results)")
    args = p.parse_args(argv)
    env = environment()
    print(env, flush=True)
    rows = []
    payload = {"env": env, "rows": rows}
    for T in args.seq_lens:
        t = torch.arange(T, device="cuda").view(1, 1, T, 1)
        own = t // args.block_size
        # Random selections among each token's causal blocks (independent per token: the worst case).
        idx = (torch.rand(1, args.kv_heads, T, args.num_selected, device="cuda") * (own + 1)).long()
        for grad in (False, True):
            fn = lambda: masks.block_mask_from_indices(  # noqa: E731
                idx, T, T, args.block_size, compute_q_blocks=grad
            )
            ms = cuda_time(fn)
            mem = peak_memory(fn)
            row = dict(T=T, n=args.num_selected, kv_heads=args.kv_heads, q_blocks=grad, ms=ms, peak_bytes=mem,
                       T_times_n_bytes_int64=T * args.num_selected * args.kv_heads * 8)
            print(row, flush=True)
            rows.append(row)
            save("block_mask", payload, args.out)  # after every row: a run cut short keeps what it measured
        if args.with_dense and T <= 16384:  # after ours: its compilation takes a while
            mask = masks.fine_selection(idx, args.block_size)
            row = dict(T=T, n=args.num_selected, kv_heads=args.kv_heads, method="create_block_mask", ms=cuda_time(
                lambda: mask.to_block_mask(T, T, device="cuda", block_size=(128, args.block_size)), 1, 3))
            print(row, flush=True)
            rows.append(row)
            save("block_mask", payload, args.out)
        del idx, t, own


if __name__ == "__main__":
    main()
