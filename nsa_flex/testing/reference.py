"""Float64 dense attention: the reference every FlexAttention path is checked against."""

from __future__ import annotations

from typing import Optional, Union

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from ..functional.dense import ScoreMod, dense_masked_attention
from ..masks import Mask, as_mask


def dense_attention(
    q: Float[Tensor, "B Hq Q D"],
    k: Float[Tensor, "B Hkv KV D"],
    v: Float[Tensor, "B Hkv KV Dv"],
    mask: Union[None, Mask, Bool[Tensor, "b h Q KV"], object] = None,
    score_mod: Optional[ScoreMod] = None,
    scale: Optional[float] = None,
    return_lse: bool = False,
):
    """``softmax(q k^T * scale + score_mod, masked) v`` in float64 with an explicit, unfused softmax.

    ``mask`` is a Mask, any mask_mod, or a bool tensor broadcastable to ``[B, Hq, Q, KV]``. GQA: ``Hq`` a
    multiple of ``Hkv``. Rows that see nothing give 0 (and ``lse = -inf``). Returns float64 ``out`` or
    ``(out, lse)``.
    """
    B, Hq, Q, _ = q.shape
    KV = k.shape[2]
    if mask is not None and not isinstance(mask, Tensor):
        mask = as_mask(mask).to_dense(Q, KV, B=B, H=Hq, device=q.device)
    return dense_masked_attention(
        q.double(), k.double(), v.double(), mask, score_mod, scale, return_lse, chunk_size=max(Q, 1)
    )
