"""NSA training/inference speed: ours vs dense attention and fla's Triton NSA, one process, same inputs.

Methods (each states exactly what it computes):

* ``sdpa_causal``   dense causal attention, ``F.scaled_dot_product_attention`` (flash / cuDNN backend), GQA.
* ``flex_causal``   dense causal attention through compiled FlexAttention (``masks.causal()``).
* ``fla_nsa``       fla ``parallel_nsa``: compressed (mean pooling, block = stride = 64) + selected branches,
                    no window branch (it needs flash-attn); only when ``fla`` imports and ``Hq/Hkv >= 16``.
* ``nsa_flex``      ours, ``functional.nsa_attention``: compressed (mean, l=32, d=16) + selected (l'=64, n=16)
                    + window (w=512), gated.

Inputs: ``random`` (independent normal q, k, v: every token's selection is independent, the worst case for
block-sparse kernels) and ``structured`` (a slowly varying random walk along the sequence plus noise, so
neighbouring tokens attend alike, as in trained models). Every method gets the same tensors, laid out
(``--layout``) as an attention layer's projections give them, ``[B, T, H, D]`` storage viewed as
``[B, H, T, D]`` (``bthd``, the default: our ``SparseAttention``, fla and flash-attn all work on it), or
contiguous ``[B, H, T, D]`` (``bhtd``). For each T: forward, and forward + ``out.backward(do)`` with one fixed
``do`` in the inputs' layout (the usual attention benchmark; until the eleventh session the step backpropagated
a ``.float().pow(2).mean()`` loss, whose elementwise passes added about 10 ms to every method at 64k), as
medians of CUDA-event timings after warm-up; the forward again captured in one CUDA graph (``fwd_graph_ms``:
its GPU time without the host's launch costs, which a single call from an idle GPU waits for); peak memory;
and a per-stage breakdown of our forward.
Writes ``bench/results/nsa.json`` and ``bench/results/nsa.png``.

``--smoke`` runs a tiny CPU version of the same code (CI runs it so the script cannot rot).

Usage: ``python -m bench.nsa [--seq-lens 8192 16384 32768 65536] [--configs paper small gqa4] [--layout bthd]
[--smoke]``
"""

from __future__ import annotations

import argparse
from typing import Callable, Optional

import torch
import torch.nn.functional as torch_F

from nsa_flex import functional as F
from nsa_flex import masks
from nsa_flex.cli import ArgParser, positive_arg
from nsa_flex.functional import selected_kernel
from nsa_flex.functional.nsa import gate
from nsa_flex.testing import nsa_inputs

from .common import RESULTS, cpu_time, cuda_graphed, cuda_time, environment, peak_memory, profile_into, save

PAPER_NSA = dict(compress_block_size=32, compress_stride=16, selection_block_size=64, num_selected=16,
                 num_initial=1, num_local=2, window_size=512)
# paper: the NSA paper's attention; small: issue 5's second configuration; gqa4: a Llama-3-8B-like layer (32 query
# heads on 8 kv heads), where the selected kernels stack four tokens' heads a program (not in the default run)
CONFIGS = {"paper": dict(heads=64, kv_heads=4, head_dim=128), "small": dict(heads=16, kv_heads=1, head_dim=128),
           "gqa4": dict(heads=32, kv_heads=8, head_dim=128)}


# Every method bench.nsa and bench.peak_memory can run (methods() gives those available here)
METHODS = ("sdpa_causal", "flex_causal", "fla_nsa", "nsa_flex")


def methods(fla_nsa: Optional[Callable]) -> dict[str, Callable]:
    causal = masks.causal()

    def sdpa(q, k, v, g):
        return torch_F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])

    def flex_causal(q, k, v, g):
        block_mask = F.branches._static_block_mask(("causal",), causal.fn, q.shape[2], k.shape[2], q.device)
        return F.flex(q, k, v, block_mask=block_mask)

    def ours(q, k, v, g):
        return F.nsa_attention(q, k, v, g, **PAPER_NSA)

    # Most informative first: a run cut short by its time slot still has ours against the references.
    out = {"sdpa_causal": sdpa, "nsa_flex": ours}
    if fla_nsa is not None:

        def fla(q, k, v, g):
            # fla's layout is [B, T, H, D]; gates [B, T, Hq].
            tq, tk, tv = (x.transpose(1, 2) for x in (q, k, v))
            gt = g.transpose(1, 2)
            o = fla_nsa(tq, tk, tv, g_cmp=gt[..., 0], g_slc=gt[..., 1], g_swa=None,
                        block_counts=PAPER_NSA["num_selected"], block_size=PAPER_NSA["selection_block_size"],
                        window_size=0)
            return o.transpose(1, 2)

        out["fla_nsa"] = fla
    out["flex_causal"] = flex_causal
    return out


def bench_inputs(T: int, shape: dict, kind: str, layout: str, device, dtype) -> tuple:
    """``q, k, v, gates`` of :func:`nsa_inputs` stored as ``layout`` says (``bthd``: ``[B, T, H, D]`` storage
    viewed ``[B, H, T, D]``, as projections give it; ``bhtd``: contiguous), and one fixed ``do`` in q's layout."""
    q, k, v, g = nsa_inputs(T, **shape, kind=kind, device=device, dtype=dtype)
    if layout == "bthd":
        q, k, v, g = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v, g))
    do = torch.empty_like(q).copy_(torch.randn(q.shape, generator=torch.Generator().manual_seed(1)))
    return q, k, v, g, do


def graphed_forward(row: dict, forward: Callable[[], object], timer: Callable) -> None:
    """``row["fwd_graph_ms"]``: the forward captured in one CUDA graph and replayed, its GPU work without Python
    and launch costs (how a served model runs it; a layer inside a model also hides them where its host code
    runs ahead of the GPU). ``fwd_ms`` times one call from an idle GPU, which waits for the host to launch each
    kernel: at 8k tokens ours spends about 2 ms of host time on 25 launches. A method that cannot be captured
    gets ``fwd_graph_error`` instead."""
    try:
        row["fwd_graph_ms"] = timer(cuda_graphed(forward))
    except Exception as err:  # noqa: BLE001 - reported in the row; the other timings stand
        row["fwd_graph_error"] = f"{type(err).__name__}: {str(err)[:200]}"


def stage_breakdown(q, k, v, g, timer) -> dict[str, float]:
    """Our forward, stage by stage (each timed on its own, inputs from the previous stage)."""
    cfg = PAPER_NSA
    l, d, ls = cfg["compress_block_size"], cfg["compress_stride"], cfg["selection_block_size"]
    G = q.shape[1] // k.shape[1]
    with torch.no_grad():
        k_cmp, v_cmp = F.mean_pool(k, l, d), F.mean_pool(v, l, d)
        o_cmp, lse = F.compressed_attention(q, k_cmp, v_cmp, l, d, return_lse=True)
        idx = F.select_blocks(q, k_cmp, l, d, ls, cfg["num_selected"], lse=lse)
        o_sel = F.selected_attention(q, k, v, idx, ls)
        o_win = F.sliding_window_attention(q, k, v, cfg["window_size"])
        return {
            "compress": timer(lambda: (F.mean_pool(k, l, d), F.mean_pool(v, l, d))),
            "compressed_attn": timer(lambda: F.compressed_attention(q, k_cmp, v_cmp, l, d, return_lse=True)),
            "scoring_topk": timer(lambda: F.select_blocks(q, k_cmp, l, d, ls, cfg["num_selected"], lse=lse)),
            # the selection's lists as the selected branch takes them: the kernels' sorted lists, else a BlockMask
            # (the branch's own time includes this again)
            "mask_build": timer(lambda: selected_kernel.block_lists(idx, G)) if selected_kernel.supported(q, k, v, ls)
            else timer(lambda: F.branches.selection_block_mask(idx, G, ls, compute_q_blocks=False)),
            "selected_attn": timer(lambda: F.selected_attention(q, k, v, idx, ls)),
            "window_attn": timer(lambda: F.sliding_window_attention(q, k, v, cfg["window_size"])),
            "gating": timer(lambda: gate(g, o_cmp, o_sel, o_win)),
        }


def load_fla() -> Optional[Callable]:
    try:
        from fla.ops.nsa import parallel_nsa
    except Exception as err:  # noqa: BLE001 - any import failure means "not available"
        print(f"fla not available ({type(err).__name__}: {err}); skipping fla_nsa")
        return None
    return parallel_nsa


def plot(rows: list[dict], path) -> None:
    """Time vs T, log scale, a panel per (config, inputs); skipped with a message without matplotlib (the JSON is
    the result, written row by row before this)."""
    try:
        import matplotlib
    except ImportError:
        print(f"matplotlib is not installed: no plot ({path}); the JSON has every row")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["config"], r["inputs"]) for r in rows})
    methods = sorted({r["method"] for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (config, inputs) in zip(axes[0], panels):
        for i, method in enumerate(methods):  # one colour per method, one line style per timing
            for key, style, what in (("fwd_ms", "--", "forward"), ("fwd_graph_ms", ":", "forward in a CUDA graph"),
                                     ("fwd_bwd_ms", "-", "forward+backward")):
                pts = sorted((r["T"], r[key]) for r in rows
                             if r["config"] == config and r["inputs"] == inputs and r["method"] == method and r.get(key))
                if pts:
                    ax.plot(*zip(*pts), style, color=f"C{i}", marker="o", label=f"{method}, {what}")
        ax.set(xscale="log", yscale="log", xlabel="sequence length T", ylabel="ms", title=f"{config}, {inputs} inputs")
        ax.legend(fontsize=7, handlelength=4)  # long enough to show each line's dashes
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> dict:
    p = ArgParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-lens", type=positive_arg, nargs="+", default=[8192, 16384, 32768, 65536])
    p.add_argument("--configs", nargs="+", default=["paper", "small"], choices=sorted(CONFIGS))
    p.add_argument("--inputs", nargs="+", default=["random", "structured"], choices=["random", "structured"])
    p.add_argument("--methods", nargs="+", default=None, choices=METHODS, metavar="METHOD",
                   help=f"a subset of {' '.join(METHODS)} (default all)")
    p.add_argument("--layout", choices=["bthd", "bhtd"], default="bthd",
                   help="storage of q, k, v, gates and do: [B, T, H, D] as projections give it, or [B, H, T, D]")
    p.add_argument("--repeats", type=positive_arg, default=10)
    p.add_argument("--profile", action="store_true",
                   help="also profile ours (forward+backward): top kernels and launches per step (in the JSON)")
    p.add_argument("--smoke", action="store_true", help="tiny CPU run of the same code (for CI)")
    p.add_argument("--out", default=str(RESULTS), help="directory for the JSON and PNG (default bench/results)")
    args = p.parse_args(argv)

    if args.smoke:
        device, dtype = torch.device("cpu"), torch.float32
        seq_lens, configs = [256], {"tiny": dict(heads=4, kv_heads=1, head_dim=16)}
        timer = cpu_time
        fla = None
    else:
        if not torch.cuda.is_available():
            p.error("bench.nsa needs CUDA (use --smoke for the CPU check)")
        device, dtype = torch.device("cuda"), torch.bfloat16
        seq_lens, configs = args.seq_lens, {name: CONFIGS[name] for name in args.configs}
        timer = lambda fn: cuda_time(fn, 3, args.repeats)  # noqa: E731
        fla = load_fla()
    env = environment()
    print(env, flush=True)
    rows = []
    payload = {"env": env, "nsa_config": PAPER_NSA, "rows": rows, "smoke": args.smoke}
    path = save("nsa_smoke" if args.smoke else "nsa", payload, args.out)
    for config, shape in configs.items():
        for inputs in args.inputs:
            for T in seq_lens:
                q, k, v, g, do = bench_inputs(T, shape, inputs, args.layout, device, dtype)
                for name, fn in methods(fla if shape["heads"] // shape["kv_heads"] >= 16 else None).items():
                    if args.methods and name not in args.methods:
                        continue
                    row = dict(config=config, inputs=inputs, T=T, method=name, layout=args.layout, **shape)
                    try:
                        with torch.no_grad():
                            row["fwd_ms"] = timer(lambda: fn(q, k, v, g))
                            if device.type == "cuda":
                                row["fwd_peak_bytes"] = peak_memory(lambda: fn(q, k, v, g))
                                graphed_forward(row, lambda: fn(q, k, v, g), timer)
                        leaves = [x.detach().requires_grad_() for x in (q, k, v, g)]

                        def step():  # as a training step after optimizer.zero_grad(): no sum into .grad
                            for x in leaves:
                                x.grad = None
                            fn(*leaves).backward(do)

                        row["fwd_bwd_ms"] = timer(step)
                        if device.type == "cuda":
                            for x in leaves:  # the peak counts this step's gradients, not the last one's
                                x.grad = None
                            row["fwd_bwd_peak_bytes"] = peak_memory(step)
                        if name == "nsa_flex":
                            row["stages_ms"] = stage_breakdown(q, k, v, g, timer)
                            if args.profile:
                                profile_into(row, f"nsa_flex fwd+bwd, T={T}", step)
                    except Exception as err:  # noqa: BLE001 - a failing method is reported, not fatal
                        row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
                    print(row, flush=True)
                    rows.append(row)
                    save(path.stem, payload, args.out)  # after every row: a run cut short keeps what it measured
    if not args.smoke:
        plot(rows, path.with_suffix(".png"))
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
