"""Language-model training throughput: NSA vs dense (and window) TransformerLM at several contexts, one process.

Every attention type trains the same :class:`~nsa_flex.modules.TransformerLM` (the ``examples/train_lm.py``
model: same width, depth, heads, MLP) on the same random byte batches, with ``--tokens`` tokens per step
(``batch = tokens // context``), bf16 autocast, AdamW, each block compiled (``Block.compile()``), as the
training script does. A step is forward + backward + optimizer step; after warm-up steps (compilation) the
median of CUDA-event timings gives tokens/s. Also peak memory. Writes ``bench/results/train_lm.json``.

* ``dense``  causal ``F.scaled_dot_product_attention`` (flash / cuDNN).
* ``window`` causal sliding window through FlexAttention.
* ``nsa``    :class:`~nsa_flex.modules.SparseAttention` (compressed + selected + window, gated).

``--smoke`` runs a tiny CPU version (eager, fp32) of the same code so the script cannot rot.

``--profile`` adds each step's top kernels and its kernel launches to the JSON (and prints the table).

Usage: ``python -m bench.train_lm [--contexts 4096 16384 32768] [--attn nsa dense window] [--profile]``
"""

from __future__ import annotations

import argparse
import contextlib

import torch
import torch.nn.functional as torch_F

from nsa_flex.cli import ArgParser, positive_arg
from nsa_flex.modules import TransformerLM

from .common import RESULTS, cpu_time, cuda_time, environment, peak_memory, profile_into, save

MODEL = dict(vocab_size=256, dim=512, depth=6, heads=8, kv_heads=2, mlp_mult=4, sliding_window_size=128,
             compress_block_size=32, compress_block_sliding_stride=16, selection_block_size=64,
             num_selected_blocks=8, compress_mlp="linear")
SMOKE_MODEL = dict(MODEL, dim=32, depth=1, heads=2, kv_heads=1, sliding_window_size=16, compress_block_size=8,
                   compress_block_sliding_stride=4, selection_block_size=16, num_selected_blocks=2)


def make_step(attn: str, context: int, batch: int, model_config: dict, device: torch.device, compile_blocks: bool):
    """One training step (closure) of a fresh model on one fixed random batch; returns (step, parameters)."""
    torch.manual_seed(0)
    model = TransformerLM(**dict(model_config, attn=attn, max_seq_len=context)).to(device)
    if compile_blocks:
        for layer in model.layers:
            layer.compile(dynamic=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95))
    ids = torch.randint(0, 256, (batch, context + 1), device=device)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())

    def step() -> None:
        with autocast:
            logits = model(ids[:, :-1])
        loss = torch_F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, sum(p.numel() for p in model.parameters())


def main(argv=None) -> dict:
    p = ArgParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", type=positive_arg, nargs="+", default=[4096, 16384, 32768])
    p.add_argument("--attn", nargs="+", default=["nsa", "dense", "window"], choices=["nsa", "dense", "window"])
    p.add_argument("--tokens", type=positive_arg, default=65536, help="tokens per step (batch = tokens // context)")
    p.add_argument("--repeats", type=positive_arg, default=10)
    p.add_argument("--profile", action="store_true",
                   help="also profile each step: its top kernels (operators on CPU) and launches (in the JSON)")
    p.add_argument("--smoke", action="store_true", help="tiny CPU run of the same code (for CI)")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    if args.smoke:
        args.contexts, args.tokens, args.repeats = [64], 128, 1
    elif not torch.cuda.is_available():  # its times are CUDA-event medians (the defaults would take hours on CPU)
        p.error("bench.train_lm needs CUDA (use --smoke for the CPU check)")
    device = torch.device("cpu" if args.smoke else "cuda")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    config = SMOKE_MODEL if args.smoke else MODEL
    env = environment()
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    print(env, settings, flush=True)
    print(f"{'attn':<8}{'context':>9}{'batch':>7}{'ms/step':>10}{'tokens/s':>12}{'peak GiB':>10}", flush=True)
    rows = []
    payload = dict(environment=env, args=settings, model=config, rows=rows)
    name = "train_lm_smoke" if args.smoke else "train_lm"
    for context in args.contexts:
        batch = max(1, args.tokens // context)
        for attn in args.attn:
            row = dict(attn=attn, context=context, batch=batch)
            try:
                step, row["parameters"] = make_step(attn, context, batch, config, device, device.type == "cuda")
                if device.type == "cuda":
                    row["ms"] = cuda_time(step, warmup=3, repeats=args.repeats)
                    row["peak_bytes"] = peak_memory(step)
                else:
                    row["ms"] = cpu_time(step, warmup=1, repeats=args.repeats)
                row["tokens_per_s"] = batch * context / row["ms"] * 1e3
                print(f"{attn:<8}{context:>9}{batch:>7}{row['ms']:>10.1f}{row['tokens_per_s']:>12.0f}"
                      f"{row.get('peak_bytes', 0) / 2**30:>10.2f}", flush=True)
                if args.profile:
                    profile_into(row, f"{attn}, context {context}", step, steps=3, rows=25)
            except Exception as err:  # one failing configuration must not hide the others
                row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                print(f"{attn:<8}{context:>9}{batch:>7}  ERROR {row['error']}", flush=True)
            rows.append(row)
            save(name, payload, args.out)  # after every row: a run cut short keeps what it measured
            if device.type == "cuda":
                torch.cuda.empty_cache()
        by_attn = {r["attn"]: r for r in rows if r["context"] == context and "tokens_per_s" in r}
        if "nsa" in by_attn and "dense" in by_attn:
            print(f"  context {context}: nsa / dense throughput = "
                  f"{by_attn['nsa']['tokens_per_s'] / by_attn['dense']['tokens_per_s']:.2f}x", flush=True)
    return payload


if __name__ == "__main__":
    main()
