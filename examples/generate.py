"""Generate bytes with a small NSA language model, using the KV cache (one parallel prefill, then one token per step).

Without ``--checkpoint`` the model is randomly initialized (so the output is noise) and tiny, to run on a CPU in
seconds; with ``--checkpoint PATH`` it loads ``{"config": TransformerLM kwargs, "model": state_dict}`` as saved
by a training script. Several prompts of different lengths are decoded as one batch.

    python examples/generate.py --prompt "Hello" --prompt "Native sparse attention" --max-new-tokens 64
    python examples/generate.py --checkpoint lm.pt --device cuda --temperature 0.8 --top-k 40

Bad arguments (and a checkpoint that cannot be read) give a one-line ``generate.py: error: ...`` and exit status 2.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Optional, Sequence

import torch

from nsa_flex.cli import ArgParser, model_from_checkpoint, report_errors, require, require_device
from nsa_flex.modules import TransformerLM

PROG = "generate.py"

# A tiny byte-level NSA model (blocks small enough that a short demo crosses compression/selection blocks).
TINY = dict(vocab_size=256, dim=64, depth=2, heads=4, kv_heads=2, attn="nsa", max_seq_len=512,
            sliding_window_size=32, compress_block_size=16, compress_block_sliding_stride=8,
            selection_block_size=16, num_selected_blocks=4)


def load_model(checkpoint: Optional[str], device: torch.device) -> TransformerLM:
    if checkpoint is None:
        return TransformerLM(**TINY).to(device)
    return model_from_checkpoint(checkpoint, "--checkpoint")[0].to(device)


def parse_args(argv: Optional[Sequence[str]] = None, prog: str = PROG) -> argparse.Namespace:
    p = ArgParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help='torch.save({"config": ..., "model": state_dict}) file')
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--prompt", action="append", default=None, help="a prompt (repeat for a batch)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate per prompt (default 32)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default 1)")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="CPU intra-op threads (default: 1 for the tiny random model, whose many small ops only "
                        "contend on more; torch's default with a checkpoint)")
    args = p.parse_args(argv)
    require(args.max_new_tokens >= 1, f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    require(args.temperature >= 0 and math.isfinite(args.temperature),
            f"--temperature must be a number >= 0, got {args.temperature}")
    require(args.top_k is None or args.top_k >= 1, f"--top-k must be >= 1, got {args.top_k}")
    require(args.threads is None or args.threads >= 1, f"--threads must be >= 1, got {args.threads}")
    require(args.prompt is None or all(args.prompt), "--prompt must not be empty")
    require_device(args.device)
    return args


def generate(args: argparse.Namespace) -> list[bytes]:
    """Decode the prompts with the model; prints each continuation and the timing, returns the new bytes."""
    threads = args.threads if args.threads is not None else (1 if args.checkpoint is None else None)
    if threads is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    model = load_model(args.checkpoint, device).eval()
    prompts = args.prompt or ["The quick brown fox", "NSA: "]
    ids = [torch.tensor(list(s.encode("utf-8")), dtype=torch.long) for s in prompts]
    longest = max(len(x) for x in ids) + args.max_new_tokens
    require(longest <= model.max_seq_len, f"the longest prompt plus --max-new-tokens is {longest} tokens, beyond "
                                          f"the model's max_seq_len {model.max_seq_len}")
    if device.type == "cuda":  # compile the prefill's and the decode step's kernels outside the timing
        model.generate(ids, min(2, args.max_new_tokens), temperature=0)
        torch.cuda.synchronize()
    generator = torch.Generator(device=device).manual_seed(args.seed)
    start = time.perf_counter()
    new = model.generate(ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                         generator=generator)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    out = []
    for prompt, row in zip(prompts, new.tolist()):
        text = bytes(row)
        out.append(text)
        print(f"{prompt!r} -> {text.decode('utf-8', errors='replace')!r}")
    source = "checkpoint" if args.checkpoint else "random init"
    warm = ", after a warm-up call" if device.type == "cuda" else ""
    print(f"{new.numel()} tokens in {seconds:.2f} s{warm} ({model.attn_kind} attention, "
          f"{sum(p.numel() for p in model.parameters())} parameters, {source})")
    return out


def main(argv: Optional[Sequence[str]] = None, prog: str = PROG) -> int:
    """Command-line entry point: 0 on success, 2 after a one-line error on stderr for bad input."""
    return report_errors(prog, lambda: generate(parse_args(argv, prog)))


if __name__ == "__main__":
    sys.exit(main())
