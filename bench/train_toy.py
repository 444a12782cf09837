"""Does the NSA layer train with compiled kernels at long context? A toy recall task on one GPU.

The sequence is a random token block of length ``period`` repeated: from the second period on, every next
token is predictable, but only by looking ``period`` tokens back, beyond the sliding window. A model of
embedding -> SparseAttention -> linear learns it only through the compressed and selected branches.
Prints the loss every few steps, peak memory, and writes bench/results/train_toy.json.

``--smoke`` runs a tiny CPU version (eager, fp32, a few steps) of the same code so the script cannot rot.

Usage: ``python -m bench.train_toy [--seq-len 8192] [--steps 60] [--compile] [--smoke] [--out DIR]``
"""

from __future__ import annotations

import contextlib
import time

import torch
from torch import nn

from nsa_flex.cli import ArgParser, positive_arg
from nsa_flex.modules import SparseAttention

from .common import RESULTS, environment, save

ATTN = dict(dim_head=64, heads=8, kv_heads=2, sliding_window_size=512, compress_block_size=32,
            compress_block_sliding_stride=16, selection_block_size=64, num_selected_blocks=8, compress_mlp="mean")
# The period stays beyond the window, as at full size, so the smoke run exercises the same branches.
SMOKE_ATTN = dict(ATTN, dim_head=16, heads=2, kv_heads=1, sliding_window_size=16, compress_block_size=8,
                  compress_block_sliding_stride=4, selection_block_size=16, num_selected_blocks=2)
SMOKE = dict(seq_len=128, period=40, steps=3, batch=2, vocab=16, dim=32)


class ToyLM(nn.Module):
    def __init__(self, vocab: int, dim: int, **attn):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.attn = SparseAttention(dim=dim, **attn)
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids):
        x = self.embed(ids)
        return self.head(x + self.attn(x))


def batch(B: int, T: int, period: int, vocab: int, device) -> torch.Tensor:
    block = torch.randint(0, vocab, (B, period), device=device)
    return block.repeat(1, T // period + 1)[:, : T + 1]


def main(argv=None) -> dict:
    p = ArgParser(description=__doc__)
    p.add_argument("--seq-len", type=positive_arg, default=8192)
    p.add_argument("--period", type=positive_arg, default=1000)
    p.add_argument("--steps", type=positive_arg, default=60)
    p.add_argument("--batch", type=positive_arg, default=2)
    p.add_argument("--vocab", type=positive_arg, default=64)
    p.add_argument("--dim", type=positive_arg, default=256)
    p.add_argument("--compile", action="store_true", help="torch.compile(model, fullgraph=True, dynamic=False)")
    p.add_argument("--smoke", action="store_true", help="tiny CPU run of the same code (for CI)")
    p.add_argument("--out", default=str(RESULTS), help="directory for train_toy.json (default bench/results)")
    args = p.parse_args(argv)
    if args.smoke:
        if args.compile:
            p.error("--compile needs CUDA (compiled FlexAttention has no CPU backward); --smoke runs eagerly")
        vars(args).update(SMOKE)
    elif not torch.cuda.is_available():
        p.error("bench.train_toy needs CUDA (use --smoke for the CPU check)")
    for name in ("seq_len", "period", "steps", "batch", "vocab", "dim"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.period >= args.seq_len:
        p.error(f"--period {args.period} must be < --seq-len {args.seq_len}: no token would be predictable")
    device = torch.device("cpu" if args.smoke else "cuda")
    env = environment()
    print(env, vars(args), flush=True)
    torch.manual_seed(0)
    model = ToyLM(args.vocab, args.dim, **(SMOKE_ATTN if args.smoke else ATTN)).to(device)
    step_fn = torch.compile(model, fullgraph=True, dynamic=False) if args.compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    losses = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.time()
    for step in range(args.steps):
        ids = batch(args.batch, args.seq_len, args.period, args.vocab, device)
        with autocast:
            logits = step_fn(ids[:, :-1])
        # Score only the predictable part (second period on).
        loss = nn.functional.cross_entropy(logits[:, args.period :].float().flatten(0, 1),
                                           ids[:, args.period + 1 :].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:4d} loss {loss.item():.4f} ({time.time() - start:.1f}s)", flush=True)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    peak_text = f", peak {peak / 2**30:.2f} GiB" if peak is not None else ""
    print(f"first loss {losses[0]:.3f}, last loss {losses[-1]:.3f}{peak_text}", flush=True)
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    payload = {"env": env, "args": settings, "losses": losses, "peak_bytes": peak}
    path = save("train_toy_smoke" if args.smoke else "train_toy", payload, args.out)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
