"""Helpers shared by test modules (pytest puts tests/ on sys.path: ``from helpers import ...``)."""

import importlib.util
from pathlib import Path
from types import ModuleType

import torch

from nsa_flex import functional as F
from nsa_flex.functional import selection

REPO = Path(__file__).resolve().parents[1]


def load_example(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` (examples are scripts, not a package) as a fresh module."""
    spec = importlib.util.spec_from_file_location(f"{name}_under_test", REPO / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_same_choices(got, want, q, k_cmp, lse, block, stride, sel, n, num_initial, num_local, tol=1e-5):
    """Equal index lists, except that blocks whose float64 scores tie within ``tol`` (relative to the largest
    score) may swap. The block_topk kernel's check, and test_nsa.py's of the float32 ranking against the float64
    reference."""
    got, want = got.cpu(), want.cpu()
    differ = (got != want).any(-1)
    if not differ.any():
        return
    B, Hq, T, D = q.shape
    Hkv, Tc = k_cmp.shape[1], k_cmp.shape[2]
    S = -(-T // sel)
    logits = torch.einsum("bhtd,bhcd->bhtc", q.double().cpu(), k_cmp.double().cpu().repeat_interleave(Hq // Hkv, 1))
    visible = torch.arange(Tc) * stride + block - 1 <= torch.arange(T).view(-1, 1)
    p = torch.where(visible, (logits * D**-0.5 - lse.double().cpu().unsqueeze(-1)).exp(), 0.0)
    p = p.view(B, Hkv, Hq // Hkv, T, Tc).sum(2)
    scores = p @ F.overlap_weights(Tc, S, block, stride, sel, dtype=torch.float64)
    scale = max(1.0, scores.abs().max().item())  # float32 rounding is relative: a tie is within tol * scale
    forced = selection.forced_rank(torch.arange(T), S, sel, num_initial, num_local) < num_initial + num_local
    scores = torch.where(forced, float(T * Hq), scores)  # above any score: forced blocks must match exactly
    scores = torch.cat([scores, torch.full_like(scores[..., :1], -1.0)], -1)  # index -1: padding
    pick = lambda idx: scores.gather(-1, idx.clamp(min=-1) % (S + 1)).sort(-1).values  # noqa: E731
    assert (pick(got) - pick(want))[differ].abs().max() <= tol * scale, "a block was chosen over a clearly better one"
