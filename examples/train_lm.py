"""Train a byte-level language model with NSA, dense or sliding-window attention on the Python standard library.

The corpus is the running Python's own ``*.py`` files (``nsa_flex.data``: deterministic train/validation split
by a hash of each file's path), so the script needs no download. It logs a tqdm progress bar, the training
loss every step and the validation loss every ``--eval-every`` steps to ``OUT/log.json``, draws
``OUT/loss.png`` (matplotlib) and keeps ``OUT/checkpoint.pt`` (written to a temporary file, then renamed: an
interrupted write leaves the previous checkpoint intact). ``--resume`` continues from it -- model, optimizer,
step, learning-rate schedule and the data sampler's random state -- so the resumed loss curve is the
uninterrupted one (exactly on CPU; on CUDA up to the kernels' own run-to-run nondeterminism). On CUDA the forward
runs under bf16 autocast.

Distributed: the same command under ``torchrun`` with ``--dist ddp`` (DistributedDataParallel) or
``--dist fsdp`` (FSDP2 ``fully_shard`` per block). Every rank draws the same global batch of ``--batch``
windows and trains on its own ``batch / world_size`` rows, so the averaged gradients are those of one process
on the whole batch. Backend: NCCL on CUDA, gloo on CPU.

Run:
    python examples/train_lm.py --smoke                                   # CPU, seconds
    python examples/train_lm.py --attn nsa --context 1024 --steps 2000 --out runs/nsa
    python examples/train_lm.py --attn dense --context 1024 --steps 2000 --out runs/dense
    python examples/train_lm.py --out runs/nsa --resume                   # continue runs/nsa/checkpoint.pt
    python examples/train_lm.py --out runs/nsa --auto-resume --time-limit 540   # repeat until it says finished
    torchrun --nproc-per-node 8 examples/train_lm.py --dist fsdp --batch 64 --out runs/nsa8
    python examples/train_lm.py --compare runs/nsa runs/dense --out runs/compare   # one plot, one table
    nsa-flex train --smoke                                                # the same script via the CLI

Without arguments and without CUDA it runs the ``--smoke`` preset. Bad arguments (and an output directory that
cannot be made, a checkpoint that cannot be read) give a one-line ``train_lm.py: error: ...`` and exit status 2.
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

from nsa_flex.cli import ArgParser, CLIError, load_checkpoint, make_dir, report_errors, require, require_device
from nsa_flex.data import WindowSampler, load_corpus
from nsa_flex.modules import TransformerLM
from nsa_flex.modules.compression import COMPRESSORS

PROG = "train_lm.py"
CHECKPOINT = "checkpoint.pt"
LOG = "log.json"
PLOT = "loss.png"
FORMAT = "nsa_flex.train_lm/1"
VOCAB = 256

# Defaults of the arguments the --smoke preset changes (None in the parser, filled in by `finalize_args`).
DEFAULTS = dict(context=1024, steps=2000, batch=16, dim=256, depth=4, heads=8, window=128, compress_block=32,
                compress_stride=16, selection_block=64, num_selected=8, eval_every=100, eval_batches=8,
                ckpt_every=500, warmup=100, max_files=None, out="runs/train_lm")
SMOKE = dict(context=64, steps=12, batch=4, dim=32, depth=2, heads=2, window=16, compress_block=8,
             compress_stride=4, selection_block=8, num_selected=4, eval_every=6, eval_batches=2,
             ckpt_every=6, warmup=2, max_files=300, out="runs/train_lm_smoke")
# Arguments a resumed run must share with its checkpoint: they change the model, the data, the batches or the
# learning-rate schedule (steps, lr, warm-up, floor), without which the resumed curve is not the uninterrupted one.
RESUME_KEYS = ("attn", "context", "batch", "dim", "depth", "heads", "dim_head", "kv_heads", "mlp_mult",
               "max_seq_len", "window", "compress_block", "compress_stride", "selection_block", "num_selected",
               "compress_mlp", "seed", "val_percent", "corpus", "max_files", "steps", "lr", "warmup",
               "min_lr_ratio")


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = ArgParser(prog=prog, description="Train a byte-level TransformerLM (NSA / dense / window attention) on the "
                                         "Python standard library's source.")
    a = p.add_argument
    a("--attn", default="nsa", help="attention: nsa, dense or window (default nsa)")
    a("--context", type=int, help=f"tokens (bytes) per training window (default {DEFAULTS['context']})")
    a("--steps", type=int, help=f"optimizer steps in total (default {DEFAULTS['steps']})")
    a("--batch", type=int, help=f"global batch in windows, split across ranks (default {DEFAULTS['batch']})")
    a("--lr", type=float, default=1e-3, help="peak learning rate, AdamW (default 1e-3)")
    a("--min-lr-ratio", type=float, default=0.1, help="cosine decays to lr * this (default 0.1)")
    a("--warmup", type=int, help=f"linear warm-up steps (default {DEFAULTS['warmup']})")
    a("--weight-decay", type=float, default=0.1, help="AdamW weight decay of the weight matrices (default 0.1)")
    a("--grad-clip", type=float, default=1.0, help="clip the global gradient norm to this; 0 = off (default 1)")
    a("--grad-accum", type=int, default=1,
      help="split each rank's share of the batch into this many micro-batches (less memory, same gradients)")
    g = p.add_argument_group("model")
    g.add_argument("--dim", type=int, help=f"model width (default {DEFAULTS['dim']})")
    g.add_argument("--depth", type=int, help=f"blocks (default {DEFAULTS['depth']})")
    g.add_argument("--heads", type=int, help=f"query heads (default {DEFAULTS['heads']})")
    g.add_argument("--dim-head", type=int, default=None, help="per-head width (default dim // heads)")
    g.add_argument("--kv-heads", type=int, default=None, help="key/value heads, GQA (default heads)")
    g.add_argument("--mlp-mult", type=int, default=4, help="MLP hidden = mlp_mult * dim (default 4)")
    g.add_argument("--max-seq-len", type=int, default=None, help="model's longest sequence (default: --context)")
    g.add_argument("--window", type=int, help=f"sliding window of nsa/window (default {DEFAULTS['window']})")
    g.add_argument("--compress-block", type=int, help=f"NSA compress_block_size (default {DEFAULTS['compress_block']})")
    g.add_argument("--compress-stride", type=int,
                   help=f"NSA compress_block_sliding_stride (default {DEFAULTS['compress_stride']})")
    g.add_argument("--selection-block", type=int,
                   help=f"NSA selection_block_size (default {DEFAULTS['selection_block']})")
    g.add_argument("--num-selected", type=int, help=f"NSA num_selected_blocks (default {DEFAULTS['num_selected']})")
    g.add_argument("--compress-mlp", default="mlp", help=f"NSA compressor, one of {sorted(COMPRESSORS)} (default mlp)")
    d = p.add_argument_group("data")
    d.add_argument("--corpus", default=None, help="directory of *.py files or one file (default: the stdlib)")
    d.add_argument("--val-percent", type=float, default=5.0, help="percent of files in validation (default 5)")
    d.add_argument("--max-files", type=int, default=None,
                   help="use only the first N files in sorted order (default all; 300 with --smoke)")
    d.add_argument("--seed", type=int, default=0, help="seed of the model init and the batches (default 0)")
    r = p.add_argument_group("run")
    r.add_argument("--out", default=None, help=f"output directory (default {DEFAULTS['out']})")
    r.add_argument("--eval-every", type=int, help=f"validate every N steps; 0 = only at the end "
                                                  f"(default {DEFAULTS['eval_every']})")
    r.add_argument("--eval-batches", type=int, help=f"validation batches (fixed windows) (default "
                                                    f"{DEFAULTS['eval_batches']})")
    r.add_argument("--ckpt-every", type=int, help=f"checkpoint every N steps and at the end; 0 = only at the end "
                                                  f"(default {DEFAULTS['ckpt_every']})")
    r.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt (which must exist)")
    r.add_argument("--auto-resume", action="store_true",
                   help="continue from OUT/checkpoint.pt if it exists, else start (for repeated time-limited runs)")
    r.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                   help="stop with a checkpoint once this invocation has trained this long (checked every step)")
    r.add_argument("--stop-after", type=int, default=None,
                   help="stop (with a checkpoint) after this many steps of this invocation, e.g. to fit a time slot")
    r.add_argument("--dist", default="none", help="none, ddp or fsdp (under torchrun) (default none)")
    r.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    r.add_argument("--precision", default="auto", help="auto (bf16 autocast on CUDA, fp32 on CPU), bf16 or fp32")
    r.add_argument("--compile", action="store_true",
                   help="torch.compile every block (dynamic=False); on CUDA, or with --attn dense on CPU "
                        "(compiled FlexAttention has no CPU backward)")
    r.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    r.add_argument("--no-plot", action="store_true", help="do not draw loss.png")
    r.add_argument("--smoke", action="store_true", help="tiny model, a few steps: a CPU check in seconds")
    r.add_argument("--compare", nargs="+", metavar="RUN_DIR", default=None,
                   help="no training: plot and tabulate the log.json of these runs into OUT (default runs/compare)")
    return p


def finalize_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill in defaults (or the --smoke preset) and validate; raises CLIError with a one-line message."""
    if args.compare and args.out is None:
        args.out = "runs/compare"
    preset = SMOKE if args.smoke else DEFAULTS
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    require(args.attn in ("nsa", "dense", "window"),
            f"unknown attention type {args.attn!r} (choose nsa, dense or window)")
    require(args.dist in ("none", "ddp", "fsdp"), f"--dist must be none, ddp or fsdp, got {args.dist!r}")
    require(args.precision in ("auto", "bf16", "fp32"),
            f"--precision must be auto, bf16 or fp32, got {args.precision!r}")
    require(args.compress_mlp in COMPRESSORS,
            f"--compress-mlp must be one of {sorted(COMPRESSORS)}, got {args.compress_mlp!r}")
    for name in ("context", "steps", "batch", "dim", "depth", "heads", "mlp_mult", "window", "compress_block",
                 "compress_stride", "selection_block", "num_selected", "eval_batches"):
        value = getattr(args, name)
        require(value >= 1, f"--{name.replace('_', '-')} must be >= 1, got {value}")
    for name in ("dim_head", "kv_heads", "max_seq_len", "max_files", "stop_after"):
        value = getattr(args, name)
        require(value is None or value >= 1, f"--{name.replace('_', '-')} must be >= 1, got {value}")
    require(args.time_limit is None or args.time_limit > 0, f"--time-limit must be > 0, got {args.time_limit}")
    for name in ("eval_every", "ckpt_every", "warmup"):
        value = getattr(args, name)
        require(value >= 0, f"--{name.replace('_', '-')} must be >= 0, got {value}")
    require(args.lr > 0 and math.isfinite(args.lr), f"--lr must be a positive number, got {args.lr}")
    require(0 <= args.min_lr_ratio <= 1, f"--min-lr-ratio must be in [0, 1], got {args.min_lr_ratio}")
    require(args.grad_clip >= 0, f"--grad-clip must be >= 0, got {args.grad_clip}")
    require(args.grad_accum >= 1, f"--grad-accum must be >= 1, got {args.grad_accum}")
    require(args.batch % args.grad_accum == 0,
            f"--batch {args.batch} must be divisible by --grad-accum {args.grad_accum}")
    require(0 < args.val_percent < 100, f"--val-percent must be in (0, 100), got {args.val_percent}")
    if args.max_seq_len is None:
        args.max_seq_len = args.context
    require(args.context <= args.max_seq_len,
            f"--context {args.context} is beyond the model's max_seq_len {args.max_seq_len}")
    if args.attn == "nsa":
        require(args.context > args.compress_block,
                f"--context {args.context} must be > --compress-block {args.compress_block} for nsa "
                "(no compressed key would exist)")
    if args.corpus is not None:
        require(os.path.exists(args.corpus), f"corpus path {args.corpus!r} does not exist")
    require_device(args.device)
    on_cpu = args.device == "cpu" or (args.device is None and not torch.cuda.is_available())
    require(not (args.compile and on_cpu and args.attn != "dense"),
            f"--compile with --attn {args.attn} needs CUDA: compiled FlexAttention has no backward on CPU")
    return args


def parse_args(argv: Optional[Sequence[str]] = None, prog: str = PROG) -> argparse.Namespace:
    return finalize_args(build_parser(prog).parse_args(argv))


def model_config(args: argparse.Namespace) -> dict[str, Any]:
    """TransformerLM keyword arguments for the command line."""
    return dict(vocab_size=VOCAB, dim=args.dim, depth=args.depth, heads=args.heads, dim_head=args.dim_head,
                kv_heads=args.kv_heads, attn=args.attn, mlp_mult=args.mlp_mult, max_seq_len=args.max_seq_len,
                sliding_window_size=args.window, compress_block_size=args.compress_block,
                compress_block_sliding_stride=args.compress_stride, selection_block_size=args.selection_block,
                num_selected_blocks=args.num_selected, compress_mlp=args.compress_mlp)


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Learning rate of update ``step`` (0-based): linear warm-up, then cosine down to lr * min_lr_ratio."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
    low = args.lr * args.min_lr_ratio
    return low + (args.lr - low) * 0.5 * (1 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------------------------------------
# Distributed set-up
# ---------------------------------------------------------------------------------------------------------
class Dist:
    """Rank, world size and device of this process (world 1 without --dist)."""

    def __init__(self, args: argparse.Namespace):
        world = int(os.environ.get("WORLD_SIZE", "1"))
        use_cuda = torch.cuda.is_available() if args.device is None else args.device.startswith("cuda")
        self.mode = args.dist
        self.initialized = False
        if args.dist == "none":
            require(world == 1, f"launched with WORLD_SIZE={world} (torchrun?): pass --dist ddp or --dist fsdp")
            self.rank, self.world, self.local_rank = 0, 1, 0
            self.device = torch.device(args.device or ("cuda" if use_cuda else "cpu"))
        else:
            require("RANK" in os.environ and "MASTER_ADDR" in os.environ,
                    f"--dist {args.dist} needs torchrun (RANK/MASTER_ADDR are not set), e.g. "
                    f"torchrun --nproc-per-node 2 examples/train_lm.py --dist {args.dist} ...")
            self.rank, self.world = int(os.environ["RANK"]), world
            self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            require(args.batch % (world * args.grad_accum) == 0,
                    f"--batch {args.batch} must be divisible by world size {world} x --grad-accum {args.grad_accum}")
            if use_cuda:
                self.device = torch.device("cuda", self.local_rank)
                torch.cuda.set_device(self.device)
            else:
                self.device = torch.device("cpu")
            import torch.distributed as dist

            self.initialized = True
            self.owns_group = not dist.is_initialized()  # a caller may have set the process group up already
            if self.owns_group:
                dist.init_process_group(backend="nccl" if use_cuda else "gloo",
                                        device_id=self.device if use_cuda else None)
            require(dist.get_world_size() == world, f"the process group has {dist.get_world_size()} ranks, "
                                                    f"WORLD_SIZE says {world}")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def local_rows(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's slice of the global batch."""
        n = batch.shape[0] // self.world
        return batch[self.rank * n:(self.rank + 1) * n]

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """Average of a scalar over ranks."""
        if not self.initialized:
            return value
        import torch.distributed as dist

        value = value.detach().clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value / self.world

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any rank (the same answer on every rank)."""
        if not self.initialized:
            return bool(flag)
        import torch.distributed as dist

        value = torch.tensor(float(flag), device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def barrier(self) -> None:
        if self.initialized:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.initialized and self.owns_group:
            import torch.distributed as dist

            release_before_teardown()
            dist.destroy_process_group()
        self.initialized = False


def release_before_teardown() -> None:
    """Free wrapped models now: DDP/FSDP modules sit in reference cycles (their hooks), so without a collection
    they die at interpreter shutdown, and gloo's threads with them can abort the process ("terminate called
    without an active exception", once in CI on CPU after a finished run)."""
    import gc

    gc.collect()


def wrap_model(model: torch.nn.Module, dist: Dist) -> torch.nn.Module:
    """DDP, or FSDP2 (``fully_shard`` on every block, then the root), or the model itself."""
    if dist.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
    if dist.mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in model.layers:
            fully_shard(layer)
        fully_shard(model)
    return model


# ---------------------------------------------------------------------------------------------------------
# Checkpoints and logs (atomic writes)
# ---------------------------------------------------------------------------------------------------------
def atomic_write(path: Path, write) -> None:
    """Call ``write(file)`` on a temporary file next to ``path``, fsync it, then rename it over ``path``.

    If anything fails before the rename, ``path`` still holds its previous content and the temporary file is
    removed.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    atomic_write(path, lambda f: torch.save(payload, f))


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Unsharded model and optimizer state dicts keyed by parameter names (a collective under FSDP/DDP)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ckpt: dict[str, Any]) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(model, optimizer, model_state_dict=ckpt["model"], optim_state_dict=ckpt["optimizer"],
                   options=StateDictOptions(full_state_dict=True))


def write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(data, indent=1).encode()))


def plot_losses(path: Path, history: dict[str, list], title: str) -> bool:
    """Training loss (raw and smoothed) and validation loss against step. False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    steps = [r["step"] for r in history["train"]]
    losses = [r["loss"] for r in history["train"]]
    if losses:
        ax.plot(steps, losses, color="C0", alpha=0.3, lw=0.8, label="train")
        k = max(1, len(losses) // 50)
        smooth = [sum(losses[max(0, i - k + 1):i + 1]) / len(losses[max(0, i - k + 1):i + 1])
                  for i in range(len(losses))]
        ax.plot(steps, smooth, color="C0", lw=1.5, label=f"train (mean of {k})" if k > 1 else None)
    if history["val"]:
        ax.plot([r["step"] for r in history["val"]], [r["loss"] for r in history["val"]], "o-", color="C3",
                ms=3, label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / byte)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------
def autocast_context(args: argparse.Namespace, device: torch.device):
    bf16 = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def lm_loss(model: torch.nn.Module, windows: torch.Tensor, args: argparse.Namespace, device: torch.device):
    """Mean next-byte cross entropy (nats) of ``windows [b, context + 1]``."""
    windows = windows.to(device, non_blocking=True)
    with autocast_context(args, device):
        logits = model(windows[:, :-1])
    return torch_F.cross_entropy(logits.float().flatten(0, 1), windows[:, 1:].flatten())


def accumulate_gradients(model: torch.nn.Module, windows: torch.Tensor, args: argparse.Namespace,
                         dist: Dist) -> torch.Tensor:
    """Backward of the mean loss over ``windows`` in ``--grad-accum`` equal micro-batches; returns that loss.

    Gradients are synchronized across ranks only on the last micro-batch (DDP ``no_sync``, FSDP2
    ``set_requires_gradient_sync``)."""
    chunks = windows.chunk(args.grad_accum)
    total = torch.zeros((), device=dist.device)
    for i, chunk in enumerate(chunks):
        last = i == len(chunks) - 1
        sync = contextlib.nullcontext()
        if dist.mode == "ddp" and not last:
            sync = model.no_sync()
        elif dist.mode == "fsdp" and args.grad_accum > 1:
            model.set_requires_gradient_sync(last)
        with sync:
            loss = lm_loss(model, chunk, args, dist.device) / len(chunks)
            loss.backward()
        total += loss.detach()
    return total


@torch.no_grad()
def evaluate(model: torch.nn.Module, val_data: torch.Tensor, args: argparse.Namespace, dist: Dist) -> float:
    """Mean validation loss over ``--eval-batches`` fixed batches (the same windows at every evaluation)."""
    model.eval()
    sampler = WindowSampler(val_data, args.context, args.batch, seed=args.seed + 1_000_003)
    total = torch.zeros((), device=dist.device)
    for _ in range(args.eval_batches):
        total += lm_loss(model, dist.local_rows(next(sampler)), args, dist.device)
    model.train()
    return float(dist.mean(total / args.eval_batches))


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Run training as configured; returns the log (also written to OUT/log.json on rank 0)."""
    dist = Dist(args)
    try:
        return _train(args, dist)
    finally:
        dist.close()


def _train(args: argparse.Namespace, dist: Dist) -> dict[str, Any]:
    out = Path(args.out)
    ckpt_path = out / CHECKPOINT
    if args.resume:
        require(ckpt_path.exists(), f"--resume: no checkpoint at {str(ckpt_path)!r}")
    resume = args.resume or (args.auto_resume and ckpt_path.exists())
    try:
        corpus = load_corpus(args.corpus, val_percent=args.val_percent, max_files=args.max_files)
    except ValueError as err:
        raise CLIError(str(err)) from None
    for split, data in (("train", corpus.train), ("validation", corpus.val)):
        require(len(data) > args.context, f"the {split} split has {len(data)} bytes, fewer than --context + 1 = "
                                          f"{args.context + 1}")
    if dist.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    torch.manual_seed(args.seed)
    config = model_config(args)
    try:
        model = TransformerLM(**config)
    except (ValueError, TypeError) as err:
        raise CLIError(f"model configuration: {err}") from None
    num_params = sum(p.numel() for p in model.parameters())
    model.to(dist.device)
    if args.compile:  # per block and in place, so parameter names (and checkpoints) stay those of the model
        for layer in model.layers:
            layer.compile(dynamic=False)
    model = wrap_model(model, dist)
    # Weight decay on matrices only (not on norm gains; the embedding is the tied output head, a matrix).
    params = list(model.parameters())
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=args.lr, betas=(0.9, 0.95))
    train_sampler = WindowSampler(corpus.train, args.context, args.batch, seed=args.seed)
    history: dict[str, list] = {"train": [], "val": []}
    start_step, elapsed_before = 0, 0.0

    if resume:
        ckpt = load_checkpoint(ckpt_path, "--resume")
        require(isinstance(ckpt, dict) and ckpt.get("format") == FORMAT,
                f"--resume: {str(ckpt_path)!r} is not a {PROG} checkpoint")
        saved = ckpt["args"]
        changed = [f"--{k.replace('_', '-')} {saved.get(k)!r} -> {getattr(args, k)!r}"
                   for k in RESUME_KEYS if saved.get(k) != getattr(args, k)]
        require(not changed, "--resume: the checkpoint was trained with other settings: " + ", ".join(changed))
        load_full_state(model, optimizer, ckpt)
        train_sampler.load_state_dict(ckpt["train_sampler"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        if dist.device.type == "cuda" and ckpt["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"])
        start_step, history, elapsed_before = ckpt["step"], ckpt["history"], ckpt.get("elapsed", 0.0)
        require(start_step <= args.steps,
                f"--resume: the checkpoint is at step {start_step}, beyond --steps {args.steps}")

    log: dict[str, Any] = {
        "args": vars(args), "model_config": config, "num_parameters": num_params, "device": str(dist.device),
        "world_size": dist.world, "torch": torch.__version__, "corpus": corpus.describe(), "history": history,
    }
    if dist.main:
        make_dir(out, "--out")  # a file in the way is a one-line error, before any training
        print(f"{PROG}: {args.attn} attention, {num_params / 1e6:.2f}M parameters, context {args.context}, "
              f"global batch {args.batch} on {dist.world} x {dist.device.type}"
              f"{' (' + args.dist + ')' if args.dist != 'none' else ''}; {corpus.describe()}"
              f"{f'; resuming at step {start_step}' if start_step else ''}", flush=True)

    def checkpoint(step: int, elapsed: float) -> None:
        model_state, optim_state = full_state(model, optimizer)  # a collective: every rank takes part
        if dist.main:
            payload = {"format": FORMAT, "step": step, "model": model_state, "optimizer": optim_state,
                       "train_sampler": train_sampler.state_dict(), "config": config, "args": vars(args),
                       "history": history, "elapsed": elapsed,
                       "rng": {"torch": torch.get_rng_state(),
                               "cuda": torch.cuda.get_rng_state() if dist.device.type == "cuda" else None}}
            save_checkpoint(ckpt_path, payload)
            write_json(out / LOG, log)
        dist.barrier()

    from tqdm.auto import tqdm

    bar = tqdm(total=args.steps, initial=start_step, disable=args.no_progress or not dist.main,
               desc=f"{args.attn} T={args.context}", unit="step", dynamic_ncols=True)
    stop = args.steps if args.stop_after is None else min(args.steps, start_step + args.stop_after)
    t0 = time.perf_counter()
    tokens_per_step = args.batch * args.context
    model.train()
    step = start_step
    while step < stop:
        lr = lr_at(step, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = accumulate_gradients(model, dist.local_rows(next(train_sampler)), args, dist)
        grad_norm = None
        if args.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # DTensor under FSDP
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        loss_value = float(dist.mean(loss.detach()))
        elapsed = elapsed_before + time.perf_counter() - t0
        history["train"].append({"step": step, "loss": loss_value, "lr": lr, "grad_norm": grad_norm,
                                 "tokens": step * tokens_per_step, "time": round(elapsed, 3)})
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"loss is {loss_value} at step {step}")
        postfix = {"loss": f"{loss_value:.3f}"}
        if (args.eval_every and step % args.eval_every == 0) or step == args.steps:
            val = evaluate(model, corpus.val, args, dist)
            history["val"].append({"step": step, "loss": val, "bpb": val / math.log(2)})
            if dist.main:
                bar.write(f"step {step}: train {loss_value:.4f}, validation {val:.4f} ({val / math.log(2):.3f} "
                          f"bits/byte), {elapsed:.0f}s")
        if history["val"]:
            postfix["val"] = f"{history['val'][-1]['loss']:.3f}"
        bar.set_postfix(postfix, refresh=False)
        bar.update(1)
        if args.time_limit is not None and dist.any(time.perf_counter() - t0 >= args.time_limit):
            stop = step  # every rank stops at the same step
        if (args.ckpt_every and step % args.ckpt_every == 0) or step == stop:
            checkpoint(step, elapsed)
    bar.close()

    run_time = time.perf_counter() - t0
    done = step - start_step
    log["summary"] = {"step": step, "finished": step == args.steps,
                      "final_train_loss": history["train"][-1]["loss"] if history["train"] else None,
                      "final_val_loss": history["val"][-1]["loss"] if history["val"] else None,
                      "steps_this_run": done, "seconds_this_run": round(run_time, 3),
                      "tokens_per_second": round(done * tokens_per_step / run_time, 1) if done else None}
    if dist.main:
        write_json(out / LOG, log)
        plotted = False if args.no_plot else plot_losses(
            out / PLOT, history, f"{args.attn}, context {args.context}, {num_params / 1e6:.2f}M params, "
                                 f"batch {args.batch}, lr {args.lr:g}")
        final = log["summary"]
        print(f"{PROG}: {'finished' if final['finished'] else 'stopped'} at step {step}/{args.steps}"
              + (f", validation loss {final['final_val_loss']:.4f}" if final["final_val_loss"] is not None else "")
              + f"; wrote {out / LOG}{', ' + str(out / PLOT) if plotted else ''}, {ckpt_path}", flush=True)
    return log


def compare_runs(run_dirs: Sequence[str], out: Path) -> dict[str, Any]:
    """Validation curves of several runs in one plot (``OUT/compare.png``), a table on stdout and in
    ``OUT/compare.json``: attention, context, parameters, steps, final train / validation loss, tokens/s."""
    logs = {}
    for run_dir in run_dirs:
        path = Path(run_dir) / LOG
        require(path.is_file(), f"--compare: no {LOG} in {run_dir!r}")
        try:
            logs[str(run_dir)] = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise CLIError(f"--compare: cannot read {str(path)!r}: {err}") from None
        log = logs[str(run_dir)]
        missing = [key for key in ("history", "args", "num_parameters")
                   if not isinstance(log, dict) or key not in log]
        require(not missing, f"--compare: {str(path)!r} is not a {PROG} log (no {', '.join(missing)})")
    rows = []
    for name, log in logs.items():
        h, a, summary = log["history"], log["args"], log.get("summary", {})
        rows.append({"run": name, "attn": a["attn"], "context": a["context"], "parameters": log["num_parameters"],
                     "steps": h["train"][-1]["step"] if h["train"] else 0,
                     "train_loss": h["train"][-1]["loss"] if h["train"] else None,
                     "val_loss": h["val"][-1]["loss"] if h["val"] else None,
                     "val_bpb": h["val"][-1]["bpb"] if h["val"] else None,
                     "tokens_per_second": summary.get("tokens_per_second"), "device": log.get("device"),
                     "world_size": log.get("world_size")})
    width = max(len(r["run"]) for r in rows)
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    print(f"{'run':<{width}}  attn    context  params  steps  train   val     bits/byte  tokens/s")
    for r in rows:
        print(f"{r['run']:<{width}}  {r['attn']:<6}  {r['context']:>7}  {r['parameters'] / 1e6:>5.2f}M  {r['steps']:>5}"
              f"  {fmt(r['train_loss'], '.4f'):<6}  {fmt(r['val_loss'], '.4f'):<6}  {fmt(r['val_bpb'], '.3f'):<9}"
              f"  {fmt(r['tokens_per_second'], '.0f')}")
    make_dir(out, "--out")
    write_json(out / "compare.json", {"runs": rows})
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {"runs": rows}
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for name, log in logs.items():
        val = log["history"]["val"]
        ax.plot([v["step"] for v in val], [v["loss"] for v in val], "o-", ms=3,
                label=f"{log['args']['attn']} T={log['args']['context']} ({name})")
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats / byte)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(out / "compare.png", lambda f: fig.savefig(f, format="png"))
    plt.close(fig)
    return {"runs": rows}


def main(argv: Optional[Sequence[str]] = None, prog: str = PROG) -> int:
    """Command-line entry point: 0 on success, 2 after a one-line error on stderr for bad input. Errors of the
    parser itself (an unknown option, a malformed number) exit with status 2 the same way, as ``--help`` exits 0."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv and not torch.cuda.is_available():
        print(f"{prog}: no arguments and no CUDA: running the --smoke preset (see --help for a real run)")
        argv = ["--smoke"]

    def run() -> None:
        args = parse_args(argv, prog)
        if args.compare:
            compare_runs(args.compare, Path(args.out))
        else:
            train(args)

    return report_errors(prog, run)


if __name__ == "__main__":
    sys.exit(main())
