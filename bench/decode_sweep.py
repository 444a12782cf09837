"""Launch settings of the fused decode kernels, swept: one NSA decode step (cache append + the kernels) per
setting, replayed in a CUDA graph, with the time of each kernel from the profiler.

The settings are :mod:`nsa_flex.functional.fused_decode`'s module constants (``_TARGET_PROGRAMS``,
``_COMPRESSED_TILE``, ``_SPARSE_STAGES``, ...); ``--grid NAME=V1,V2 ...`` times every combination of the given
values, the others at their defaults. The step is :func:`nsa_decode` called eagerly (not compiled: the
constants are read at each call), so its graph also holds the few small torch kernels of the glue (the RoPE
frequencies), which the compiled step fuses. Same inputs as :mod:`bench.decode` (paper config, bf16, random
cache). Prints one line per setting: median ms per step over ``--repeats`` replays and the kernels' us.

Usage: ``python -m bench.decode_sweep --context 65536 --batch 16 --grid _TARGET_PROGRAMS=256,512,1024``
"""

from __future__ import annotations

import contextlib
import io
import itertools

import torch

from nsa_flex import functional as F
from nsa_flex.cli import ArgParser, positive_arg
from nsa_flex.functional import fused_decode

from .common import cuda_graphed, cuda_time, environment, profile_into
from .decode import CONFIGS, PAPER_NSA, ROTARY_BASE, make_state


def parse_grid(items: list[str]) -> dict[str, list[int]]:
    """``["NAME=1,2", ...]`` -> ``{"NAME": [1, 2]}``; names must be fused_decode's constants."""
    grid = {}
    for item in items:
        name, sep, values = item.partition("=")
        if not sep or not values:
            raise ValueError(f"--grid: expected NAME=V1,V2, got {item!r}")
        if not isinstance(getattr(fused_decode, name, None), int):
            raise ValueError(f"--grid: {name!r} is not an integer setting of nsa_flex.functional.fused_decode")
        try:
            grid[name] = [int(v) for v in values.split(",")]
        except ValueError:
            raise ValueError(f"--grid: {name}'s values must be integers, got {values!r}") from None
    return grid


def main(argv=None) -> list[dict]:
    p = ArgParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--context", type=positive_arg, default=65536)
    p.add_argument("--batch", type=positive_arg, default=16)
    p.add_argument("--config", default="paper", choices=sorted(CONFIGS))
    p.add_argument("--grid", nargs="*", default=[], help="NAME=V1,V2 of fused_decode's launch constants")
    p.add_argument("--repeats", type=positive_arg, default=50)
    args = p.parse_args(argv)
    try:
        grid = parse_grid(args.grid)
    except ValueError as err:
        p.error(str(err))
    if not torch.cuda.is_available():
        p.error("bench.decode_sweep needs CUDA")
    print(environment(), flush=True)
    state = make_state(args.batch, args.context, **CONFIGS[args.config], cfg=PAPER_NSA, device="cuda",
                       dtype=torch.bfloat16)
    cache = state["cache"]

    def step():
        cache.append(state["k_new"], state["v_new"], state["positions"], "mean", "mean")
        return F.nsa_decode(state["q"], cache.k, cache.v, cache.k_cmp, cache.v_cmp, state["positions"],
                            state["gates"], **PAPER_NSA, rotary_base=ROTARY_BASE, use_kernel=True)

    defaults = {name: getattr(fused_decode, name) for name in grid}
    rows = []
    for values in itertools.product(*grid.values()):
        setting = dict(zip(grid, values))
        for name, value in setting.items():
            setattr(fused_decode, name, value)
        row = dict(setting)
        try:
            with torch.no_grad():
                replay = cuda_graphed(step)
                row["ms"] = round(cuda_time(replay, 5, args.repeats), 4)
                with contextlib.redirect_stdout(io.StringIO()):
                    profile_into(row, "", replay)
            row["kernels_us"] = {e["name"][:40]: round(e["self_us_per_step"], 1) for e in row.pop("profile_top")}
        except Exception as err:  # noqa: BLE001 - a setting the kernels reject is reported, not fatal
            row["error"] = f"{type(err).__name__}: {str(err)[:200]}"
        print(row, flush=True)
        rows.append(row)
    for name, value in defaults.items():
        setattr(fused_decode, name, value)
    return rows


if __name__ == "__main__":
    main()
