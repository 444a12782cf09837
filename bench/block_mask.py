"""Time and memory of ``masks.block_mask_from_indices`` (O(T*n)) against ``create_block_mask`` (T x T mask_mod).

By default the mask is built as NSA's selection branch builds it: the ``G`` query heads of a kv head folded
into query rows (``rows_per_token=G``, ``T*G`` rows) in tiles of ``functional.branches.SELECTION_TILE_ROWS``
rows rounded up to a multiple of ``G``; ``--group 1 --q-block-size 128`` gives the plain (unfolded) layout.
With ``q_blocks`` the transposed lists that backward reads are built too. ``--smoke`` runs a tiny CPU version.

Usage: ``python -m bench.block_mask [--seq-lens 8192 65536] [--num-selected 16] [--group 16]``
"""

from __future__ import annotations

import torch

from nsa_flex import masks
from nsa_flex.cli import ArgParser, positive_arg
from nsa_flex.functional.branches import selection_tile_rows
from nsa_flex.masks.mask import build_block_mask
from nsa_flex.masks.selection import fine_selection_mod

from .common import RESULTS, cpu_time, cuda_time, environment, peak_memory, save


def main(argv=None) -> dict:
    p = ArgParser(description=__doc__)
    p.add_argument("--seq-lens", type=positive_arg, nargs="+", default=[8192, 16384, 32768, 65536])
    p.add_argument("--num-selected", type=positive_arg, default=16)
    p.add_argument("--kv-heads", type=positive_arg, default=4)
    p.add_argument("--block-size", type=positive_arg, default=64)
    p.add_argument("--group", type=positive_arg, default=16,
                   help="query heads per kv head, folded into rows (paper: 16)")
    p.add_argument("--q-block-size", type=positive_arg, default=None,
                   help="query rows per tile (default: the selection branch's, SELECTION_TILE_ROWS rounded to G)")
    p.add_argument("--with-dense", action="store_true",
                   help="also time create_block_mask of the same mask's mask_mod at T <= 16384 "
                        "(compiles for a while)")
    p.add_argument("--smoke", action="store_true", help="tiny CPU run of the same code (for CI)")
    p.add_argument("--out", default=str(RESULTS), help="directory for block_mask.json (default bench/results)")
    args = p.parse_args(argv)
    if args.smoke:
        device, timer, args.seq_lens, args.with_dense = "cpu", cpu_time, [256], False
    elif not torch.cuda.is_available():
        p.error("bench.block_mask needs CUDA (use --smoke for the CPU check)")
    else:
        device, timer = "cuda", cuda_time
    G = args.group
    tile = args.q_block_size or selection_tile_rows(G)
    if tile % G:  # block_mask_from_indices would refuse it inside the timing loop
        p.error(f"--q-block-size {tile} must be a multiple of --group {G} (whole tokens per tile)")
    env = environment()
    print(env, flush=True)
    rows = []
    payload = {"env": env, "group": G, "q_block_size": tile, "rows": rows}
    name = "block_mask_smoke" if args.smoke else "block_mask"
    for T in args.seq_lens:
        t = torch.arange(T, device=device).view(1, 1, T, 1)
        own = t // args.block_size
        # Random selections among each token's causal blocks (independent per token: the worst case).
        idx = (torch.rand(1, args.kv_heads, T, args.num_selected, device=device) * (own + 1)).long()
        for grad in (False, True):
            fn = lambda: masks.block_mask_from_indices(  # noqa: E731
                idx, T * G, T, args.block_size, tile, compute_q_blocks=grad, rows_per_token=G
            )
            row = dict(T=T, n=args.num_selected, kv_heads=args.kv_heads, group=G, q_block_size=tile, q_blocks=grad,
                       ms=timer(fn), T_times_n_bytes_int64=T * args.num_selected * args.kv_heads * 8)
            if device == "cuda":
                row["peak_bytes"] = peak_memory(fn)
            print(row, flush=True)
            rows.append(row)
            save(name, payload, args.out)  # after every row: a run cut short keeps what it measured
        if args.with_dense and T <= 16384:  # after ours: its compilation takes a while
            # the same BlockMask (folded rows, the same tiles) from the dense mask_mod, as torch builds any mask
            mod = fine_selection_mod(idx, args.block_size, 1, G)
            row = dict(T=T, n=args.num_selected, kv_heads=args.kv_heads, group=G, q_block_size=tile,
                       method="create_block_mask",
                       ms=cuda_time(lambda: build_block_mask(mod, T * G, T, 1, args.kv_heads, "cuda",
                                                             (tile, args.block_size)), 1, 3))
            print(row, flush=True)
            rows.append(row)
            save(name, payload, args.out)
        del idx, t, own
    return payload


if __name__ == "__main__":
    main()
