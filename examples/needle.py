"""Needle in a haystack (passkey retrieval): can a model recall a key-value pair from far back in its context?

Each sequence is random filler bytes (lowercase letters and spaces) with one needle ``#KEY=VALUE;`` placed at a
chosen *depth* (0 = the start of the context, 1 = just before the question), and ends with the question
``?KEY>`` followed by the value, which the model must produce. KEY and VALUE are random digit strings. For each
attention type the script trains a tiny byte-level TransformerLM on this task (loss on the value bytes only), or
fine-tunes one trained by ``examples/train_lm.py`` (``--init OUT/checkpoint.pt``), then reports retrieval
accuracy by depth: the fraction of sequences whose whole value comes out right (teacher-forced argmax, which
equals greedy decoding's exact match), and per-digit accuracy.

Expected picture (needs a GPU run to show it): dense attention retrieves at every depth; sliding-window attention
only when the needle lies within its window of the question; NSA should retrieve at every depth through its
compressed and selected blocks.

Run:
    python examples/needle.py --smoke                          # CPU, seconds: tiny models, few steps
    python examples/needle.py --attn nsa dense window --context 2048 --steps 3000 --out runs/needle
    python examples/needle.py --init runs/nsa/checkpoint.pt --steps 500 --out runs/needle_ft

Writes ``OUT/needle.json`` (accuracy per attention type and depth, training losses) and ``OUT/needle.png``.
Without arguments and without CUDA it runs ``--smoke``. Bad arguments: one-line ``needle.py: error: ...``, exit 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as torch_F

from nsa_flex.cli import ArgParser, CLIError, make_dir, model_from_checkpoint, report_errors, require, require_device
from nsa_flex.modules import TransformerLM
from nsa_flex.modules.compression import COMPRESSORS

PROG = "needle.py"
FILLER = torch.tensor(list(b"abcdefghijklmnopqrstuvwxyz "), dtype=torch.long)
DIGITS = torch.tensor(list(b"0123456789"), dtype=torch.long)
KEY, EQUALS, END, QUESTION, ANSWER = (ord(c) for c in "#=;?>")

DEFAULTS = dict(context=2048, steps=3000, batch=32, dim=256, depth=4, heads=8, window=128, compress_block=32,
                compress_stride=16, selection_block=64, num_selected=8, depths=11, eval_samples=100,
                out="runs/needle")
SMOKE = dict(context=64, steps=8, batch=4, dim=32, depth=2, heads=2, window=16, compress_block=8,
             compress_stride=4, selection_block=8, num_selected=2, depths=3, eval_samples=4,
             out="runs/needle_smoke")


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = ArgParser(prog=prog, description="Passkey retrieval accuracy by depth for NSA / dense / window attention.")
    a = p.add_argument
    a("--attn", nargs="+", default=None, help="attention types to train from scratch (default: nsa dense window)")
    a("--init", action="append", default=[], metavar="CKPT",
      help="fine-tune a train_lm.py checkpoint instead (repeatable; its attention type and size are used)")
    a("--context", type=int, help=f"sequence length in bytes (default {DEFAULTS['context']})")
    a("--steps", type=int, help=f"training steps per model (default {DEFAULTS['steps']})")
    a("--batch", type=int, help=f"sequences per step (default {DEFAULTS['batch']})")
    a("--lr", type=float, default=1e-3, help="AdamW learning rate, cosine decay (default 1e-3)")
    a("--key-len", type=int, default=4, help="digits in the key (default 4)")
    a("--value-len", type=int, default=5, help="digits in the value (default 5)")
    a("--dim", type=int, help=f"model width (default {DEFAULTS['dim']})")
    a("--depth", type=int, help=f"blocks (default {DEFAULTS['depth']})")
    a("--heads", type=int, help=f"query heads (default {DEFAULTS['heads']})")
    a("--window", type=int, help=f"sliding window of nsa/window (default {DEFAULTS['window']})")
    a("--compress-block", type=int, help=f"NSA compress_block_size (default {DEFAULTS['compress_block']})")
    a("--compress-stride", type=int, help=f"NSA compress stride (default {DEFAULTS['compress_stride']})")
    a("--selection-block", type=int, help=f"NSA selection_block_size (default {DEFAULTS['selection_block']})")
    a("--num-selected", type=int, help=f"NSA num_selected_blocks (default {DEFAULTS['num_selected']})")
    a("--compress-mlp", default="mlp", help=f"NSA compressor, one of {sorted(COMPRESSORS)} (default mlp; "
      "'linear' or 'mean' keep NSA's parameter count close to dense)")
    a("--depths", type=int, help=f"evaluated depths, evenly spaced in [0, 1] (default {DEFAULTS['depths']})")
    a("--eval-samples", type=int, help=f"sequences per depth (default {DEFAULTS['eval_samples']})")
    a("--seed", type=int, default=0, help="seed of models, training and evaluation sequences (default 0)")
    a("--out", default=None, help=f"output directory (default {DEFAULTS['out']})")
    a("--device", default=None, help="cpu or cuda (default: cuda if available)")
    a("--no-progress", action="store_true", help="no tqdm progress bar")
    a("--no-plot", action="store_true", help="do not draw needle.png")
    a("--smoke", action="store_true", help="tiny models, a few steps: a CPU check in seconds")
    return p


def parse_args(argv: Optional[Sequence[str]] = None, prog: str = PROG) -> argparse.Namespace:
    args = build_parser(prog).parse_args(argv)
    for key, value in (SMOKE if args.smoke else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.attn is None:
        args.attn = [] if args.init else ["nsa", "dense", "window"]
    for attn in args.attn:
        require(attn in ("nsa", "dense", "window"), f"unknown attention type {attn!r} (choose nsa, dense or window)")
    for name in ("context", "steps", "batch", "key_len", "value_len", "dim", "depth", "heads", "window",
                 "compress_block", "compress_stride", "selection_block", "num_selected", "depths", "eval_samples"):
        require(getattr(args, name) >= 1, f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    require(args.lr > 0, f"--lr must be > 0, got {args.lr}")
    require(args.context >= needle_len(args) + tail_len(args) + 1,
            f"--context {args.context} is too short for a needle of {needle_len(args)} and a question of "
            f"{tail_len(args)} bytes")
    require(args.compress_mlp in COMPRESSORS,
            f"--compress-mlp must be one of {sorted(COMPRESSORS)}, got {args.compress_mlp!r}")
    if "nsa" in args.attn:
        require(args.context > args.compress_block,
                f"--context {args.context} must be > --compress-block {args.compress_block} for nsa")
    for path in args.init:
        require(os.path.isfile(path), f"--init: no checkpoint file at {path!r}")
    require_device(args.device)
    return args


# ---------------------------------------------------------------------------------------------------------
# The task
# ---------------------------------------------------------------------------------------------------------
def needle_len(args) -> int:
    return args.key_len + args.value_len + 3  # "#" key "=" value ";"


def tail_len(args) -> int:
    return args.key_len + args.value_len + 2  # "?" key ">" value


def make_batch(depths: torch.Tensor, args, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences ``[B, context + 1]`` with the needle at the given depths (each in [0, 1]) and the question at
    the end; returns ``(tokens, answer_mask)``, where ``answer_mask [B, context]`` marks the targets
    (``tokens[:, 1:]``) that are value digits after the question."""
    B, L = depths.shape[0], args.context + 1
    K, V = args.key_len, args.value_len
    tokens = FILLER[torch.randint(len(FILLER), (B, L), generator=generator)]
    keys = DIGITS[torch.randint(10, (B, K), generator=generator)]
    values = DIGITS[torch.randint(10, (B, V), generator=generator)]
    col = lambda c: torch.full((B, 1), c, dtype=torch.long)  # noqa: E731
    needle = torch.cat([col(KEY), keys, col(EQUALS), values, col(END)], dim=1)
    tail = torch.cat([col(QUESTION), keys, col(ANSWER), values], dim=1)
    last_start = L - tail.shape[1] - needle.shape[1]
    starts = (depths.clamp(0, 1) * last_start).round().long()
    rows = torch.arange(B)[:, None]
    tokens[rows, starts[:, None] + torch.arange(needle.shape[1])] = needle
    tokens[:, L - tail.shape[1]:] = tail
    answer = torch.zeros(B, L - 1, dtype=torch.bool)
    answer[:, L - 1 - V:] = True
    return tokens, answer


def answer_logits(model, tokens: torch.Tensor, answer: torch.Tensor, device, autocast) -> torch.Tensor:
    """Logits ``[B, V, 256]`` at the answer positions."""
    with autocast:
        logits = model(tokens[:, :-1].to(device))
    B = tokens.shape[0]
    return logits.float()[answer.to(device)].view(B, -1, logits.shape[-1])


def autocast_for(device: torch.device):
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_model(model, args, device, label: str) -> list[float]:
    """Train on needles at uniformly random depths; returns the loss per step."""
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(args.seed + 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.01)
    warmup = max(1, args.steps // 20)
    losses = []
    model.train()
    bar = tqdm(range(args.steps), desc=f"train {label}", disable=args.no_progress, dynamic_ncols=True)
    for step in bar:
        lr = args.lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        tokens, answer = make_batch(torch.rand(args.batch, generator=gen), args, gen)
        logits = answer_logits(model, tokens, answer, device, autocast_for(device))
        loss = torch_F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:][answer].to(device))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    return losses


@torch.no_grad()
def evaluate(model, args, device) -> dict[str, list[float]]:
    """Exact-match and per-digit accuracy at each depth (fixed sequences: the same for every model)."""
    model.eval()
    gen = torch.Generator().manual_seed(args.seed + 2)
    depths = torch.linspace(0, 1, args.depths).tolist() if args.depths > 1 else [0.0]
    exact, digits = [], []
    for depth in depths:
        hit = right = 0
        for start in range(0, args.eval_samples, args.batch):
            n = min(args.batch, args.eval_samples - start)
            tokens, answer = make_batch(torch.full((n,), depth), args, gen)
            pred = answer_logits(model, tokens, answer, device, autocast_for(device)).argmax(-1).cpu()
            ok = pred == tokens[:, 1:][answer].view(n, -1)
            hit += int(ok.all(-1).sum())
            right += int(ok.sum())
        exact.append(hit / args.eval_samples)
        digits.append(right / (args.eval_samples * args.value_len))
    model.train()
    return {"depths": depths, "accuracy": exact, "digit_accuracy": digits}


def build_models(args, device) -> list[tuple[str, TransformerLM, dict[str, Any]]]:
    models = []
    for i, attn in enumerate(args.attn):
        torch.manual_seed(args.seed)
        config = dict(vocab_size=256, dim=args.dim, depth=args.depth, heads=args.heads, attn=attn,
                      max_seq_len=args.context, sliding_window_size=args.window,
                      compress_block_size=args.compress_block, compress_block_sliding_stride=args.compress_stride,
                      selection_block_size=args.selection_block, num_selected_blocks=args.num_selected,
                      compress_mlp=args.compress_mlp)
        try:
            models.append((attn, TransformerLM(**config).to(device), config))
        except (ValueError, TypeError) as err:
            raise CLIError(f"model configuration ({attn}): {err}") from None
    for path in args.init:
        model, config = model_from_checkpoint(path, "--init")
        require(args.context <= model.max_seq_len,
                f"--context {args.context} is beyond the checkpoint's max_seq_len {model.max_seq_len} ({path})")
        models.append((f"{model.attn_kind} (fine-tuned {Path(path).parent.name or path})", model.to(device), config))
    return models


def plot(path: Path, results: dict[str, Any]) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=120)
    for label, r in results.items():
        ax.plot(r["eval"]["depths"], r["eval"]["accuracy"], "o-", ms=4, label=label)
    ax.set_xlabel("needle depth (0 = start of context, 1 = just before the question)")
    ax.set_ylabel("retrieval accuracy (exact value)")
    ax.set_ylim(-0.03, 1.03)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def run(args) -> dict[str, Any]:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    models = build_models(args, device)
    out = make_dir(args.out, "--out")  # a file in the way is a one-line error, before any training
    chance = 0.1 ** args.value_len
    print(f"{PROG}: context {args.context}, key {args.key_len} + value {args.value_len} digits, {args.steps} steps "
          f"x batch {args.batch} per model on {device.type}; chance of an exact value {chance:.0e}")
    results: dict[str, Any] = {}
    for label, model, config in models:
        start = time.perf_counter()
        losses = train_model(model, args, device, label)
        evaluation = evaluate(model, args, device)
        results[label] = {"config": config, "train_loss": losses, "eval": evaluation,
                          "num_parameters": sum(p.numel() for p in model.parameters()),
                          "seconds": round(time.perf_counter() - start, 2)}
    depths = next(iter(results.values()))["eval"]["depths"] if results else []
    width = max([len(k) for k in results] + [9])
    print(f"\nretrieval accuracy (exact value) by needle depth, {args.eval_samples} sequences each")
    print(f"{'attention':<{width}} " + " ".join(f"{d:>5.2f}" for d in depths) + "   mean  final loss")
    for label, r in results.items():
        acc = r["eval"]["accuracy"]
        print(f"{label:<{width}} " + " ".join(f"{a:>5.2f}" for a in acc)
              + f"  {sum(acc) / len(acc):>5.2f}  {r['train_loss'][-1]:>10.3f}")
    report = {"args": vars(args), "device": str(device), "torch": torch.__version__, "results": results}
    (out / "needle.json").write_text(json.dumps(report, indent=1))
    plotted = not args.no_plot and plot(out / "needle.png", results)
    print(f"wrote {out / 'needle.json'}{', ' + str(out / 'needle.png') if plotted else ''}")
    if args.smoke:
        print("(smoke run: models this small and this short cannot learn retrieval; the numbers show the pipeline "
              "works, not what the attention types can do. Run without --smoke on a GPU for that.)")
    return report


def main(argv: Optional[Sequence[str]] = None, prog: str = PROG) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv and not torch.cuda.is_available():
        print(f"{prog}: no arguments and no CUDA: running the --smoke preset (see --help for a real run)")
        argv = ["--smoke"]
    return report_errors(prog, lambda: run(parse_args(argv, prog)))


if __name__ == "__main__":
    sys.exit(main())
