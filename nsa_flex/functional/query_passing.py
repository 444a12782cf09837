"""Passing ``q`` from branch to branch, so the branches' gradients of ``q`` are summed in place.

In ``nsa_attention`` the compressed branch hands ``q`` on to the selected one, and that one to the window: each
branch's autograd Function returns ``q`` as an output, and the next branch attends with it. In the backward the
next branch's gradient of ``q`` then arrives at the previous branch's Function, whose backward adds its own
``dq`` into that tensor in place, where autograd would sum the two in a pass of its own over a q-sized tensor
(eager only: under ``torch.compile`` the compiler fuses the sums, and the branches pass ``q`` itself).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from .flex import RECOMPILE_LIMIT
from .layout import in_layout_of


def gradient_to_add_into(dq_other: Optional[Tensor], q: Tensor) -> Optional[Tensor]:
    """The incoming gradient of ``q`` as a buffer a backward may add into, with ``q``'s strides: ``dq_other``
    itself (as a view) when it has ``q``'s dtype and layout (in ``nsa_attention`` it does), else a copy;
    ``None`` stays ``None``."""
    if dq_other is None:
        return None
    return in_layout_of(dq_other, q) if dq_other.dtype == q.dtype else torch.empty_like(q).copy_(dq_other)


def add_into(into: Tensor, x: Tensor) -> None:
    """``into += x``; on CUDA compiled, since ``into`` is often a strided view (the compressed branch adds its
    ``dq`` into the folded view of q's gradient), where torch's add runs its generic, unvectorized kernel
    (64k tokens, paper configuration, H100: the step 0.5-0.9 ms faster with the compiled add)."""
    if into.is_cuda and not torch.compiler.is_compiling():
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
            _compiled_add()(into, x)
    else:
        into.add_(x)


@functools.lru_cache(maxsize=None)
def _compiled_add():
    return torch.compile(lambda into, x: into.add_(x), dynamic=False)
