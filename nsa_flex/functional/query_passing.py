"""Passing ``q`` from branch to branch, so the branches' gradients of ``q`` are summed in place.

In ``nsa_attention`` the compressed branch hands ``q`` on to the selected one, and that one to the window: each
branch's autograd Function returns ``q`` as an output, and the next branch attends with it. In the backward the
next branch's gradient of ``q`` then arrives at the previous branch's Function, whose backward adds its own
``dq`` into that tensor in place, where autograd would sum the two in a pass of its own over a q-sized tensor
(eager only: under ``torch.compile`` the compiler fuses the sums, and the branches pass ``q`` itself).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def gradient_to_add_into(dq_other: Optional[Tensor], q: Tensor) -> Optional[Tensor]:
    """The incoming gradient of ``q`` as a buffer a backward may add into: ``dq_other`` itself when it has ``q``'s
    dtype and strides (in ``nsa_attention`` it does), else a copy that has them; ``None`` stays ``None``."""
    if dq_other is None or (dq_other.dtype == q.dtype and dq_other.stride() == q.stride()):
        return dq_other
    return torch.empty_like(q).copy_(dq_other)
