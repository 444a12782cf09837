"""Where a forward+backward step's peak GPU memory goes: the tensors alive at the peak, by the line that made them.

One warm-up step, then one step with torch's allocator history recorded; the trace is replayed (allocations
add, frees subtract) to find the moment of the peak, and the blocks alive then are listed largest first with
the innermost frames of this project (``nsa_flex``, ``bench``) that allocated them. A throwaway version of
it showed, in the eleventh session, that NSA's step peaked inside the compressed branch's cuDNN backward
(a 4 GiB float32 workspace at 64k, paper config), which led to cutting that peak from 11.5 to 8.2 GiB above
the inputs. (This script's CUDA path was written after that session's device time ran out: not yet run on
a GPU.)

Same inputs and step as ``bench.nsa`` (``out.backward(do)``, inputs stored as ``--layout`` says). Writes
``bench/results/peak_memory.json``. ``--smoke`` runs the steps on a tiny CPU problem and the replay on a
synthetic trace (the allocator history is CUDA-only).

Usage: ``python -m bench.peak_memory [--seq-len 65536] [--config paper] [--methods sdpa_causal nsa_flex]``
"""

from __future__ import annotations

import argparse
from typing import Callable

import torch

from nsa_flex.cli import ArgParser, positive_arg

from .common import RESULTS, environment, save
from .nsa import CONFIGS, METHODS, bench_inputs, load_fla, methods

OURS = ("nsa_flex", "bench")  # the folders of frames worth naming (whole path components)
INSTALLED = ("site-packages", "dist-packages")  # below these, the package is the next folder, whatever the path


def live_at_peak(trace: list[dict], min_bytes: int = 0) -> tuple[int, list[dict]]:
    """Replay one device's allocator trace (``torch.cuda.memory._snapshot()["device_traces"][i]``):
    ``(peak bytes allocated above the trace's start, [{"bytes", "where"}] alive then, largest first)``.

    ``alloc`` adds a block, ``free_requested`` (the program released it) removes it; the other actions
    (segment maps, completed frees) do not change what the program holds.
    """
    live: dict[int, dict] = {}
    current = peak = 0
    at_peak: dict[int, dict] = {}
    for event in trace:
        if event["action"] == "alloc":
            live[event["addr"]] = event
            current += event["size"]
        elif event["action"] == "free_requested" and event["addr"] in live:
            current -= live.pop(event["addr"])["size"]
        if current > peak:
            peak, at_peak = current, dict(live)
    blocks = [{"bytes": e["size"], "where": where(e.get("frames", []))} for e in at_peak.values()
              if e["size"] >= min_bytes]
    return peak, sorted(blocks, key=lambda b: -b["bytes"])


def where(frames: list[dict], depth: int = 3) -> str:
    """The innermost ``depth`` frames from this project (``file:line function``), else the innermost frame."""
    ours = [f for f in frames if _is_ours(f.get("filename", ""))] or frames[:1]
    return "; ".join(f"{f['filename'].rsplit('/', 1)[-1]}:{f['line']} {f['name']}" for f in ours[:depth])


def _is_ours(filename: str) -> bool:
    """A frame of this project: an ``OURS`` folder in its path, below any installed-packages folder (so that torch
    in a virtualenv inside a checkout named nsa_flex does not count, nor torch/utils/benchmark)."""
    parts = filename.replace("\\", "/").split("/")[:-1]
    installed = [i for i, part in enumerate(parts) if part in INSTALLED]
    return any(part in OURS for part in parts[installed[-1] + 1 if installed else 0:])


def traced_step(step: Callable[[], None]) -> list[dict]:
    """Run ``step`` once with the allocator history on; the current device's trace."""
    torch.cuda.synchronize()
    torch.cuda.memory._record_memory_history(max_entries=1_000_000)
    try:
        step()
        torch.cuda.synchronize()
        snapshot = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    return snapshot["device_traces"][torch.cuda.current_device()]


SMOKE_TRACE = [  # a tensor freed before a larger pair is alive together: the peak is the pair
    {"action": "alloc", "addr": 1, "size": 100, "frames": [{"filename": "x/nsa_flex/a.py", "line": 3, "name": "f"}]},
    {"action": "free_requested", "addr": 1, "size": 100},
    {"action": "alloc", "addr": 2, "size": 60, "frames": []},
    {"action": "alloc", "addr": 3, "size": 70, "frames": [{"filename": "torch/x.py", "line": 9, "name": "g"}]},
    {"action": "free_completed", "addr": 2, "size": 60},
    {"action": "free_requested", "addr": 3, "size": 70},
]


def main(argv=None) -> dict:
    p = ArgParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-len", type=positive_arg, default=65536)
    p.add_argument("--config", default="paper", choices=sorted(CONFIGS))
    p.add_argument("--inputs", default="random", choices=["random", "structured"])
    p.add_argument("--layout", choices=["bthd", "bhtd"], default="bthd")
    p.add_argument("--methods", nargs="+", default=["sdpa_causal", "nsa_flex"], choices=METHODS, metavar="METHOD",
                   help=f"a subset of {' '.join(METHODS)} (default sdpa_causal nsa_flex)")
    p.add_argument("--min-mib", type=float, default=16.0, help="list blocks of at least this size")
    p.add_argument("--smoke", action="store_true", help="tiny CPU run of the steps, replay of a synthetic trace")
    p.add_argument("--out", default=str(RESULTS), help="directory for the JSON (default bench/results)")
    args = p.parse_args(argv)

    if args.smoke:
        device, dtype, T, shape = torch.device("cpu"), torch.float32, 256, dict(heads=4, kv_heads=1, head_dim=16)
    else:
        if not torch.cuda.is_available():
            p.error("bench.peak_memory needs CUDA (use --smoke for the CPU check)")
        device, dtype, T, shape = torch.device("cuda"), torch.bfloat16, args.seq_len, CONFIGS[args.config]
    env = environment()
    print(env, flush=True)
    q, k, v, g, do = bench_inputs(T, shape, args.inputs, args.layout, device, dtype)
    leaves = [x.detach().requires_grad_() for x in (q, k, v, g)]
    fla = load_fla() if "fla_nsa" in args.methods and not args.smoke else None
    rows = []
    payload = {"env": env, "T": T, "config": args.config, "layout": args.layout, "rows": rows, "smoke": args.smoke}
    result = "peak_memory_smoke" if args.smoke else "peak_memory"
    path = save(result, payload, args.out)  # a bad --out fails now; rewritten after every method
    for name, fn in methods(fla).items():
        if name not in args.methods:
            continue

        def step():
            for x in leaves:
                x.grad = None
            fn(*leaves).backward(do)

        if args.smoke:
            if name == "flex_causal":  # FlexAttention has no CPU backward
                continue
            step()
            peak, blocks = live_at_peak(SMOKE_TRACE)
        else:
            step()  # compiles, and fills the caching allocator
            peak, blocks = live_at_peak(traced_step(step), int(args.min_mib * 2**20))
        row = {"method": name, "peak_bytes": peak, "live_at_peak": blocks}
        rows.append(row)
        print(f"{name}: peak {peak / 2**30:.2f} GiB above the step's start; alive then:", flush=True)
        for block in blocks:
            print(f"  {block['bytes'] / 2**30:7.3f} GiB  {block['where']}")
        save(result, payload, args.out)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
