"""Honest timing: warm-up, CUDA events, median of repeats, peak memory, and the environment printed."""

from __future__ import annotations

import importlib
import json
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch

# The default --out, relative like any command's output: under the directory a benchmark runs in (the checkout's
# bench/results/ for `python -m bench.NAME` run there, ./bench/results/ for `nsa-flex bench NAME` run elsewhere).
RESULTS = Path("bench", "results")


def environment() -> dict:
    """Versions and device, printed at the top of every benchmark and stored with its results."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    env = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        # what else decides the figures: cuDNN runs the window (through cudnn-frontend, where installed) and
        # the compressed branch; fla is the NSA reference; the commit is the code that was timed
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cudnn_frontend": _version("cudnn"),
        "fla": _version("fla"),
        "commit": _commit(),
    }
    return env


def _version(module: str):
    """``module.__version__``, None where it is not installed."""
    try:
        return getattr(importlib.import_module(module), "__version__", "unknown")
    except ImportError:
        return None
    except Exception as err:  # noqa: BLE001 - installed but failing to import (e.g. against this triton)
        return f"unimportable ({type(err).__name__})"


def _commit():
    """The checkout's git commit (with ``+dirty`` for uncommitted changes), None outside a git checkout."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode:
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def cuda_time(fn: Callable[[], object], warmup: int = 3, repeats: int = 10) -> float:
    """Median milliseconds of ``fn()`` over ``repeats`` runs timed with CUDA events, after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def cuda_graphed(fn: Callable[[], object], warmup: int = 3) -> Callable[[], None]:
    """``fn`` captured in one CUDA graph: returns a callable that replays it (the step's GPU work without its
    Python and launch costs). ``fn`` is run ``warmup`` times on a side stream first (compilations, allocator
    pools), so it must tolerate repeats; the graph reads and writes the very tensors ``fn`` used."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def cpu_time(fn: Callable[[], object], warmup: int = 1, repeats: int = 3) -> float:
    """Median wall milliseconds of ``fn()`` (the CPU smoke modes' stand-in for CUDA events)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def peak_memory(fn: Callable[[], object]) -> int:
    """Peak bytes allocated on the GPU while ``fn()`` runs, above what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def save(name: str, payload: dict, directory: Path = RESULTS) -> Path:
    """Write ``payload`` as ``<directory>/<name>.json`` and return the path; exits with a one-line message when
    the directory (``--out``) cannot hold it."""
    path = Path(directory) / f"{name}.json"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=2))
    except FileExistsError:  # from mkdir: a file where the directory should be
        raise SystemExit(f"--out: {str(directory)!r} exists and is not a directory") from None
    except OSError as err:
        raise SystemExit(f"--out: cannot write {str(path)!r}: {err.strerror or err}") from None
    return path


def profile_into(row: dict, label: str, fn: Callable[[], object], steps: int = 5, rows: int = 12) -> None:
    """Where ``fn()``'s time goes: a torch.profiler run of ``steps`` calls after one warm-up call.

    Stores ``row["ops_per_step"]`` and ``row["profile_top"]`` (``[{"name", "self_us_per_step",
    "calls_per_step"}]``) and prints the profiler's table under ``label``. On CUDA the rows are device kernels
    (self device time; ``ops_per_step`` counts kernel launches), on CPU they are operators (self CPU time).
    Slow ops and too many small ones are both visible.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    cuda = torch.cuda.is_available()
    fn()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch_profile(activities=activities) as prof:
        for _ in range(steps):
            fn()
        if cuda:
            torch.cuda.synchronize()
    events = prof.key_averages()
    if cuda:
        chosen = [e for e in events if e.device_type == DeviceType.CUDA]
        key, time_of = "self_device_time_total", (lambda e: e.self_device_time_total)
    else:
        chosen = [e for e in events if e.device_type == DeviceType.CPU and not e.key.startswith("ProfilerStep")]
        key, time_of = "self_cpu_time_total", (lambda e: e.self_cpu_time_total)
    chosen.sort(key=time_of, reverse=True)
    row["ops_per_step"] = sum(e.count for e in chosen) / steps
    row["profile_top"] = [{"name": e.key[:120], "self_us_per_step": time_of(e) / steps,
                           "calls_per_step": e.count / steps} for e in chosen[:rows]]
    table = events.table(sort_by=key, row_limit=rows, max_name_column_width=60)
    print(f"{label}: {row['ops_per_step']:.0f} ops per step\n{table}", flush=True)
