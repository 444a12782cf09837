"""cudnn-frontend's graph API, as the branches use it: attention graphs built once per shape, layout and device,
executed on torch's current stream with their inputs and outputs wherever torch keeps them (any strides).

torch's SDPA reaches cuDNN only with a plain or causal mask and allocates its own outputs; the graph API takes
a diagonal band (the window branch, :mod:`.window_cudnn`) and writes into views of our tensors (the compressed
branch's folded output, :mod:`.compressed_sdpa`). cudnn-frontend is the optional ``cudnn`` extra
(``pip install nvidia-cudnn-frontend``; 1.16 has no further dependencies): :data:`cudnn` is ``None`` without it.
"""

from __future__ import annotations

import collections
import warnings
from typing import Callable

import torch
from torch import Tensor

try:
    import cudnn
except ImportError:  # the optional `cudnn` extra
    cudnn = None

_GRAPHS: "collections.OrderedDict[tuple, tuple]" = collections.OrderedDict()
_GRAPH_CACHE_SIZE = 64
_HANDLES: dict[int, int] = {}
_IO = {torch.bfloat16: "BFLOAT16", torch.float16: "HALF"}


def _handle(index: int) -> int:
    if index not in _HANDLES:
        with torch.cuda.device(index):
            _HANDLES[index] = cudnn.create_handle()
    return _HANDLES[index]


def builds(verdicts: dict, key: tuple, build: Callable[[], object], refused: Callable[[], str]) -> bool:
    """Whether ``build()`` (which builds graphs) succeeds for ``key``: tried once per key, the verdict kept in
    ``verdicts``; where cuDNN refuses, one warning, ``refused()`` followed by cuDNN's error (a callable, so
    that the calls after the first, one per forward, format no message)."""
    if key not in verdicts:
        try:
            build()
            verdicts[key] = True
        except Exception as err:  # noqa: BLE001 - cuDNN reports unsupported graphs with several exception types
            warnings.warn(f"{refused()} ({type(err).__name__}: {err})", stacklevel=4)
            verdicts[key] = False
    return verdicts[key]


def stats_like(q: Tensor) -> Tensor:
    """An empty float32 log-sum-exp ``[B, H, T, 1]`` for attention with queries ``q [B, H, T, D]``."""
    return q.new_empty(*q.shape[:3], 1, dtype=torch.float32)


def cached(key: tuple, build):
    """``build()``'s ``(graph, nodes, workspace_size)`` for ``key``, built once (least recently used dropped
    past :data:`_GRAPH_CACHE_SIZE`)."""
    if key not in _GRAPHS:
        _GRAPHS[key] = build()
        if len(_GRAPHS) > _GRAPH_CACHE_SIZE:
            _GRAPHS.popitem(last=False)
    _GRAPHS.move_to_end(key)
    return _GRAPHS[key]


def layout(*xs: Tensor) -> tuple:
    """The shapes and strides of ``xs``: what a graph is built for (part of its cache key)."""
    return tuple((tuple(x.shape), tuple(x.stride())) for x in xs)


def new_graph(dtype: torch.dtype, index: int):
    io = getattr(cudnn.data_type, _IO[dtype])
    return cudnn.pygraph(io_data_type=io, intermediate_data_type=cudnn.data_type.FLOAT,
                         compute_data_type=cudnn.data_type.FLOAT, handle=_handle(index))


def tensor(graph, x: Tensor, name: str):
    """A graph input with ``x``'s shape, strides and dtype."""
    data_type = cudnn.data_type.FLOAT if x.dtype == torch.float32 else getattr(cudnn.data_type, _IO[x.dtype])
    return graph.tensor(name=name, dim=list(x.shape), stride=list(x.stride()), data_type=data_type)


def output(node, x: Tensor):
    """Mark ``node`` a graph output written with ``x``'s shape and strides (and dtype, for float32 ones)."""
    node.set_output(True).set_dim(list(x.shape)).set_stride(list(x.stride()))
    if x.dtype == torch.float32:
        node.set_data_type(cudnn.data_type.FLOAT)


def finish(graph) -> int:
    """Validate and build ``graph`` (raises where cuDNN has no engine for it); returns its workspace size."""
    graph.validate()
    graph.build_operation_graph()
    graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    graph.check_support()
    graph.build_plans()
    return graph.get_workspace_size()


def forward_graph(q: Tensor, k: Tensor, v: Tensor, out: Tensor, stats: Tensor, scale: float, index: int,
                  **mask):
    """The attention forward ``out, stats = sdpa(q, k, v)`` for these layouts (``stats`` the float32
    log-sum-exp, ``[B, H, T, 1]``); ``mask``: cudnn-frontend's ``sdpa`` mask arguments, which must be
    hashable values (they are part of the cache key)."""
    def build():
        g = new_graph(q.dtype, index)
        tq, tk, tv = tensor(g, q, "q"), tensor(g, k, "k"), tensor(g, v, "v")
        to, ts = g.sdpa(name="attention", q=tq, k=tk, v=tv, generate_stats=True, attn_scale=scale, **mask)
        output(to, out)
        output(ts, stats)
        return g, (tq, tk, tv, to, ts), finish(g)

    return cached(("fwd", layout(q, k, v, out, stats), str(q.dtype), scale, tuple(sorted(mask.items())), index),
                  build)


def backward_graph(q: Tensor, k: Tensor, v: Tensor, out: Tensor, do: Tensor, stats: Tensor, dq: Tensor,
                   dk: Tensor, dv: Tensor, scale: float, index: int, **mask):
    """The attention backward writing ``dq, dk, dv`` for these layouts; ``mask`` as in :func:`forward_graph`."""
    def build():
        g = new_graph(q.dtype, index)
        ins = [tensor(g, x, name) for x, name in ((q, "q"), (k, "k"), (v, "v"), (out, "o"), (do, "do"),
                                                    (stats, "stats"))]
        tq, tk, tv, to, tdo, ts = ins
        grads = g.sdpa_backward(name="attention_backward", q=tq, k=tk, v=tv, o=to, dO=tdo, stats=ts,
                                attn_scale=scale, **mask)
        for t, x in zip(grads, (dq, dk, dv)):
            output(t, x)
        return g, (*ins, *grads), finish(g)

    return cached(("bwd", layout(q, k, v, out, do, stats, dq, dk, dv), str(q.dtype), scale,
                   tuple(sorted(mask.items())), index), build)


def execute(graph_entry, tensors, device: torch.device) -> None:
    """Run a graph from :func:`forward_graph` / :func:`backward_graph` on ``tensors`` (its nodes' order) on
    torch's current stream, with a workspace from torch's allocator."""
    graph, nodes, workspace_size = graph_entry
    index = device.index
    cudnn.set_stream(handle=_handle(index), stream=torch.cuda.current_stream(device).cuda_stream)
    workspace = torch.empty(max(workspace_size, 1), dtype=torch.uint8, device=device)
    graph.execute(dict(zip(nodes, tensors)), workspace, handle=_handle(index))
