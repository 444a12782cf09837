"""Compose a custom sparsity pattern from nsa_flex masks and see what it costs.

Shows: building a pattern with ``&``, ``|`` and ``~`` from library generators plus a hand-written
mask_mod wrapped in ``Mask``; its ``repr`` (the expression it was built from); its density (fraction of
query-key pairs allowed) and its block sparsity (fraction of FlexAttention blocks skipped); a text drawing;
and, if matplotlib is installed, a PNG with the BlockMask grid.

Run:  python examples/compose_pattern.py [--png FILE.png] [--seq-len 512] [--block-size 64]

Bad arguments give a one-line ``compose_pattern.py: error: ...`` and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import Optional, Sequence

import torch

from nsa_flex import masks
from nsa_flex.cli import (ArgParser, CLIError, check_size, png_path, render_text, report_errors, require, save_png,
                          view_mask)

PROG = "compose_pattern.py"


def summary_tokens(every: int) -> masks.Mask:
    """A hand-written pattern: every ``every``-th token is a "summary" token that all later queries may see."""

    def summary_tokens(b, h, q_idx, kv_idx):
        # Tensor ops only (no Python `and`/`if`): FlexAttention evaluates mask_mods under vmap and compile.
        return (kv_idx % every == every - 1) & (kv_idx <= q_idx)

    return masks.Mask(summary_tokens, name=f"summary_tokens({every})")


def build_pattern() -> masks.Mask:
    """Local causal window of 64 + 4 causal attention sinks + a summary token every 32 tokens."""
    local = masks.causal() & masks.sliding_window(64)
    sinks = masks.causal() & masks.global_tokens(4)  # StreamingLLM-style sinks, kept causal
    return local | sinks | summary_tokens(32)


def parse_args(argv: Optional[Sequence[str]] = None, prog: str = PROG) -> argparse.Namespace:
    parser = ArgParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=512, help="queries and keys (default 512)")
    parser.add_argument("--block-size", type=int, default=64, help="BlockMask block size (default 64)")
    parser.add_argument("--png", type=png_path, help="where to draw the PNG (default: in the temporary directory)",
                        default=os.path.join(tempfile.gettempdir(), "nsa_flex_compose_pattern.png"))
    args = parser.parse_args(argv)
    for name in ("seq_len", "block_size"):
        value = getattr(args, name)
        require(value >= 1, f"--{name.replace('_', '-')} must be >= 1, got {value}")
    png_dir = os.path.dirname(os.path.abspath(args.png))
    require(os.path.isdir(png_dir), f"--png: no directory {png_dir!r} to write {args.png!r} in")
    try:
        check_size(build_pattern(), args.seq_len, args.seq_len, (args.block_size, args.block_size))
    except ValueError as err:
        raise CLIError(f"--seq-len {args.seq_len}, --block-size {args.block_size}: {err}") from None
    return args


def show(args: argparse.Namespace) -> None:
    T, bs = args.seq_len, args.block_size
    pattern = build_pattern()
    print("pattern:", repr(pattern))

    # The two materializations: a dense bool mask (for checking) and a BlockMask (for flex_attention).
    dense = pattern.to_dense(T, T)  # bool [1, 1, T, T]
    block_mask = pattern.to_block_mask(T, T, block_size=bs)
    print(f"density: {dense.float().mean().item():.2%} of {T}x{T} pairs allowed")
    # torch's BlockMask.sparsity() is the percentage of blocks skipped.
    print(f"block sparsity at {bs}x{bs}: {block_mask.sparsity():.2f}% of blocks skipped")

    # The pattern is causal by construction; an algebraic check of that with the mask itself:
    future = pattern & ~masks.causal()
    assert not future.to_dense(T, T).any(), "pattern lets a query see the future"
    print(f"{future!r}: empty, so the pattern is causal")

    print()
    view = view_mask(pattern, T, T, (bs, bs))
    print(render_text(view))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("\n(matplotlib not installed: no PNG)")
    else:
        save_png(view, args.png)
        print(f"\nwrote {args.png}")
    torch.testing.assert_close(dense[0, 0], view.dense[0, 0])


def main(argv: Optional[Sequence[str]] = None, prog: str = PROG) -> int:
    """Command-line entry point: 0 on success, 2 after a one-line error on stderr for bad input."""
    # save_png's CLIError too: a PNG that cannot be written after all (no permission)
    return report_errors(prog, lambda: show(parse_args(argv, prog)))


if __name__ == "__main__":
    sys.exit(main())
