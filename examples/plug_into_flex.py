"""Plug nsa_flex masks into existing ``flex_attention`` code: a one-line swap, identical output.

Shows: a typical FlexAttention snippet with a hand-written causal ``mask_mod``; the same snippet with the
``mask_mod`` replaced by ``nsa_flex.masks.causal()`` (a ``Mask`` *is* a mask_mod, so torch's own
``create_block_mask`` takes it unchanged) giving bit-identical output; then a richer pattern
(sliding window + attention sinks) built and materialized by nsa_flex, checked against float64 dense attention.

Run:  python examples/plug_into_flex.py
"""

from __future__ import annotations

import warnings

import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from nsa_flex import masks
from nsa_flex.testing import dense_attention

# On CPU, flex_attention runs eagerly (exact, no fused kernel); torch warns about that. On CUDA wrap
# flex_attention in torch.compile as usual.
warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")

B, H, T, D = 2, 4, 256, 32
device = "cuda" if torch.cuda.is_available() else "cpu"
gen = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(B, H, T, D, generator=gen).to(device) for _ in range(3))


# --- before: the existing code ------------------------------------------------------------------------
def causal_mask(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


block_mask = create_block_mask(causal_mask, B=None, H=None, Q_LEN=T, KV_LEN=T, device=device)
out_before = flex_attention(q, k, v, block_mask=block_mask)

# --- after: the one changed line (causal_mask -> masks.causal()) --------------------------------------
block_mask = create_block_mask(masks.causal(), B=None, H=None, Q_LEN=T, KV_LEN=T, device=device)
out_after = flex_attention(q, k, v, block_mask=block_mask)

assert torch.equal(out_before, out_after), "swapping in masks.causal() changed the output"
print(f"hand-written causal mask_mod vs masks.causal(): identical output {tuple(out_after.shape)}")

# --- and now patterns that would be fiddly to hand-write ------------------------------------------------
pattern = masks.causal() & (masks.sliding_window(64) | masks.global_tokens(4))
block_mask = pattern.to_block_mask(T, T, device=device, block_size=64)  # same as create_block_mask(pattern, ...)
out = flex_attention(q, k, v, block_mask=block_mask)
ref = dense_attention(q, k, v, mask=pattern)  # float64, explicit softmax over the dense mask
err = (out.double() - ref).abs().max().item()
assert err < 1e-5, f"flex output differs from dense attention by {err}"
print(f"{pattern!r}: block sparsity {block_mask.sparsity():.1f}%, max |flex - dense float64| = {err:.1e}")

# A Mask also composes with an existing hand-written mask_mod:
mixed = masks.Mask(causal_mask) & masks.sliding_window(64)
assert torch.equal(mixed.to_dense(T, T), (masks.causal() & masks.sliding_window(64)).to_dense(T, T))
print(f"{mixed!r}: same mask as causal() & sliding_window(64)")
