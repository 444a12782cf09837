"""Does the NSA layer train with compiled kernels at long context? A toy recall task on one GPU.

The sequence is a random token block of length ``period`` repeated: from the second period on, every next
token is predictable, but only by looking ``period`` tokens back, beyond the sliding window. A model of
embedding -> SparseAttention -> linear learns it only through the compressed and selected branches.
Prints the loss every few steps, peak memory, and writes bench/results/train_toy.json.

Usage: ``python -m bench.train_toy [--seq-len 8192] [--steps 60] [--compile]``
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from nsa_flex.modules import SparseAttention

from .common import environment, save


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


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--period", type=int, default=1000)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--vocab", type=int, default=64)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--compile", action="store_true", help="torch.compile(model, fullgraph=True, dynamic=False)")
    args = p.parse_args(argv)
    env = environment()
    print(env, vars(args), flush=True)
    torch.manual_seed(0)
    model = ToyLM(args.vocab, args.dim, dim_head=64, heads=8, kv_heads=2, sliding_window_size=512,
                  compress_block_size=32, compress_block_sliding_stride=16, selection_block_size=64,
                  num_selected_blocks=8, compress_mlp="mean").cuda()
    step_fn = torch.compile(model, fullgraph=True, dynamic=False) if args.compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    torch.cuda.reset_peak_memory_stats()
    start = time.time()
    for step in range(args.steps):
        ids = batch(args.batch, args.seq_len, args.period, args.vocab, "cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = step_fn(ids[:, :-1])
        # Score only the predictable part (second period on).
        loss = nn.functional.cross_entropy(logits[:, args.period :].float().flatten(0, 1), ids[:, args.period + 1 :].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:4d} loss {loss.item():.4f} ({time.time() - start:.1f}s)", flush=True)
    peak = torch.cuda.max_memory_allocated()
    print(f"first loss {losses[0]:.3f}, last loss {losses[-1]:.3f}, peak {peak / 2**30:.2f} GiB", flush=True)
    save("train_toy", {"env": env, "args": vars(args), "losses": losses, "peak_bytes": peak})


if __name__ == "__main__":
    main()
