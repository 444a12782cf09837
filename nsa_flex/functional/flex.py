"""One entry point to FlexAttention for the whole package: compiled on CUDA, eager on CPU, never silently slow.

* On CUDA, ``flex_attention`` runs through ``torch.compile``; without it torch uses an unfused path that
  materializes ``Q x KV`` scores. Dynamo gives up compiling a frame after ``recompile_limit`` recompiles and
  then, by default, *silently* runs it eagerly (out of memory at T=32k, found early in this project). We compile
  with ``fail_on_recompile_limit_hit`` so that case raises an error that says what to do.
* On CPU, eager FlexAttention is exact (it materializes scores, which is what CPU tests want) but has no
  backward; :func:`needs_dense_path` tells the functional layer to take its exact dense path instead.
* ``return_lse``/``return_aux`` differ between torch versions; :func:`flex` hides that.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import warnings
from typing import Callable, Optional, Sequence, Union

import torch
import torch._functorch.config as functorch_config
from jaxtyping import Float
from torch import Tensor
from torch.nn.attention import flex_attention as _fa
from torch.nn.attention.flex_attention import BlockMask

from .._checks import score_mod_heads, tensor

try:  # torch >= 2.9
    from torch.nn.attention.flex_attention import AuxRequest
except ImportError:  # pragma: no cover - older torch
    AuxRequest = None


class SlowPathError(RuntimeError):
    """A fused FlexAttention kernel could not be used and the fallback would materialize T x T scores."""


@functools.lru_cache(maxsize=None)
def _compiled_flex() -> Callable:
    # Static shapes: on torch 2.11 the dynamic-shape kernels fail to lower for our masks (NoValidChoicesError
    # for strided q, broken bounds checks in mask_mods that index captured tensors). Each new shape compiles
    # once; callers with many lengths bucket them (TransformerLM.generate pads its prefill).
    return torch.compile(_fa.flex_attention, fullgraph=True, dynamic=False)


# Backward tiles (BLOCK_M1, BLOCK_N1, BLOCK_M2, BLOCK_N2, stages, warps): each of the four must divide its sparse
# block size (M: Q, N: KV), and BLOCK_N1 % BLOCK_M1 == 0, BLOCK_M2 % BLOCK_N2 == 0. The first three serve 64-token
# KV blocks (NSA's selection), the last two 32- and 16-token ones; every pair of power-of-two blocks from 16 to 128
# has at least one tile that fits.
SMALL_BLOCK_BWD_TILES = ((64, 64, 64, 64, 3, 4), (32, 64, 64, 32, 3, 4), (16, 64, 16, 16, 3, 4),
                         (16, 32, 32, 16, 3, 4), (16, 16, 16, 16, 3, 4))
# Kernels are specialized per mask (window, compressed, selection, users'), shape and grad mode: an NSA model
# needs 3 per training shape, 3 per evaluation shape and 3 per prefill bucket (up to 10 buckets to 64k).
# We allow that many deliberately, and fail loudly past it instead of falling back to T x T.
RECOMPILE_LIMIT = 64


@functools.lru_cache(maxsize=None)
def enable_small_block_kernels() -> bool:
    """Let compiled FlexAttention backward run on BlockMasks with KV blocks of 16, 32 or 64 tokens.

    Torch's default backward tiles must divide both sparse block sizes and some releases filter them before
    user ``kernel_options`` apply, so a ``(128, 64)``, ``(32, 32)`` or ``(128, 16)`` BlockMask gets
    ``NoValidChoicesError``. (The forward takes ``kernel_options`` before its filter: :func:`forward_tiles`
    handles it.) This appends :data:`SMALL_BLOCK_BWD_TILES` to inductor's backward candidates
    (``torch._inductor.config.inductor_choices_class``), after torch's own, for the backwards none of torch's
    own fits (:func:`backward_tiles_to_add`); torch's choice for the others stays as it is. Torch keeps the
    candidates that fit the BlockMask's blocks; where several do, its ``select_algorithm`` benchmarks them
    while compiling and keeps the fastest (the first under ``torch._inductor.config.deterministic``).
    Called when this module is imported on a machine with CUDA, and again by each CUDA call (a no-op then);
    returns False if this torch lacks the hook.
    """
    try:
        from torch._inductor import config as inductor_config
        from torch._inductor.choices import InductorChoices
        from torch._inductor.template_heuristics.triton import FlexBwDConfig
    except ImportError:  # pragma: no cover - depends on the torch release
        warnings.warn("nsa_flex: this torch has no inductor choices hook; backward with KV blocks under 128 may fail")
        return False
    base = inductor_config.inductor_choices_class or InductorChoices
    if not isinstance(base, type):
        warnings.warn("nsa_flex: a custom inductor_choices_class factory is installed; leaving it unchanged")
        return False
    if getattr(base, "_nsa_flex_tiles", False):
        return True

    class NSAFlexChoices(base):  # type: ignore[valid-type, misc]
        _nsa_flex_tiles = True

        def get_flex_attention_bwd_configs(self, head_dim, dtype, device_type="cuda"):
            configs = list(super().get_flex_attention_bwd_configs(head_dim, dtype, device_type))
            own = [(c.block_m1, c.block_n1, c.block_m2, c.block_n2) for c in configs]
            return configs + [FlexBwDConfig(*t) for t in backward_tiles_to_add(own, _lowering_block_sizes())]

        def uuid(self):  # part of inductor's cache key
            parent = getattr(super(), "uuid", None)
            return f"nsa_flex_tiles:where-none-fits:{SMALL_BLOCK_BWD_TILES}:{parent() if parent else ''}"

    # Inductor pickles the choices class into its cache key: make it importable by name from this module.
    NSAFlexChoices.__module__, NSAFlexChoices.__qualname__ = __name__, "NSAFlexChoices"
    globals()["NSAFlexChoices"] = NSAFlexChoices
    inductor_config.inductor_choices_class = NSAFlexChoices
    # Inductor builds its choices object from the config once per thread, at its first compile: if something
    # compiled in this thread before this call, replace the plain default it built (other threads' objects,
    # such as autograd's, are out of reach: hence the call on import below).
    from torch._inductor.virtualized import V

    if type(V.choices) is base:
        V.set_choices_handler(NSAFlexChoices())
    return True


def backward_tiles_to_add(torch_tiles: Sequence[tuple[int, ...]],
                          block_sizes: Optional[tuple[int, int]]) -> tuple[tuple[int, ...], ...]:
    """The :data:`SMALL_BLOCK_BWD_TILES` offered to inductor beside torch's own backward tiles ``torch_tiles``
    (``(BLOCK_M1, BLOCK_N1, BLOCK_M2, BLOCK_N2, ...)``) for a backward over ``block_sizes = (Q block, KV
    block)``: none where one of torch's fits, all where none does, and all where the sizes are unknown (None).

    Offered everywhere, ours also fit 128-token blocks, so every such backward compile benchmarked six
    candidates instead of lowering torch's one: 2.1-2.4 -> 6.1-6.5 s a compile, and no faster kernel (a
    causal ``(128, 128)`` BlockMask, 4096 tokens, 8 heads of 64, bf16, H100, torch 2.11; fwd+bwd 1.01-1.15
    ms either way). Importing nsa_flex should not change what torch does where torch works.
    """
    if block_sizes is not None and any(_tile_fits(tile, *block_sizes) for tile in torch_tiles):
        return ()
    return SMALL_BLOCK_BWD_TILES


def _tile_fits(tile: tuple[int, ...], q_block: int, kv_block: int) -> bool:
    """Inductor's filter: BLOCK_M1 and BLOCK_M2 divide the Q block, BLOCK_N1 and BLOCK_N2 the KV block."""
    m1, n1, m2, n2 = tile[:4]
    return q_block % m1 == q_block % m2 == kv_block % n1 == kv_block % n2 == 0


# The names inductor's flex backward lowering gives the sparse block sizes (torch 2.11 and 2.13).
_LOWERING_BLOCK_NAMES = ("SPARSE_Q_BLOCK_SIZE", "SPARSE_KV_BLOCK_SIZE")


def _lowering_block_sizes(depth: int = 3) -> Optional[tuple[int, int]]:
    """The ``(Q, KV)`` sparse block sizes of the backward inductor is lowering, read from the locals of the
    lowering function that asked for tiles (it passes only the head dim and dtype, and filters the tiles by
    these sizes afterwards); None if no caller within ``depth`` frames holds both as integers."""
    frame = sys._getframe(1)
    for _ in range(depth):
        frame = frame.f_back
        if frame is None:
            return None
        found = [frame.f_locals.get(name) for name in _LOWERING_BLOCK_NAMES]
        if all(size is not None for size in found):
            try:
                return int(found[0]), int(found[1])
            except (TypeError, ValueError):  # symbolic sizes
                return None
    return None


def _call(fn: Callable, *args, **kwargs):
    if AuxRequest is not None and kwargs.pop("return_lse", False):
        out, aux = fn(*args, return_aux=AuxRequest(lse=True), **kwargs)
        return out, aux.lse
    return fn(*args, **kwargs)


def forward_tiles(block_mask: Optional[BlockMask], q: Tensor, k: Tensor) -> dict:
    """Forward ``kernel_options`` whose tiles divide the BlockMask's block sizes (none needed for multiples of 128).

    Compiled FlexAttention's default forward tile must divide the sparse block sizes; on torch 2.11 / H100 a
    ``(128, 64)`` or ``(16, 64)`` BlockMask otherwise fails to lower ("Q and KV block size must be divisible
    by BLOCK_M and BLOCK_N"). ``fwd_`` keys leave the backward's own tiles alone.

    With fewer than 128 query rows the row tile is at most the flex-decoding kernel's own
    (:func:`decoding_rows`). That kernel sets its row-boundary checks from its own tile and only then
    applies ``fwd_BLOCK_M``; a larger tile reads the rows past the last query as if they were queries, and
    the output is wrong with no error (torch 2.11, H100: a ``(128, 16)`` BlockMask and 16 queries). A smaller
    power of two still divides the Q block, whichever kernel torch picks.
    """
    if block_mask is None:
        return {}
    q_block, kv_block = block_mask.BLOCK_SIZE
    if q_block % 128 == 0 and kv_block % 128 == 0:
        return {}
    # the largest power of two dividing each block size, at most 64
    rows = min(64, q_block & -q_block)
    if q.shape[-2] < 128:
        rows = min(rows, decoding_rows(q, k))
    return {"fwd_BLOCK_M": rows, "fwd_BLOCK_N": min(64, kv_block & -kv_block)}


def decoding_rows(q: Tensor, k: Tensor) -> int:
    """The row tile of torch's flex-decoding kernel: the ``G * Lq`` rows of a kv head, to a power of two >= 16."""
    return max(16, 1 << max(0, q.shape[-2] * (q.shape[1] // k.shape[1]) - 1).bit_length())


def decode_kernel_options(q: Tensor, k: Tensor, block_mask) -> dict:
    """``kernel_options`` that keep torch off its flex-decoding kernel where that kernel has no valid tile.

    For fewer than 128 query rows torch picks a decoding kernel that tiles the ``G * Lq`` rows of a kv head with
    ``BLOCK_M = next_pow2(G * Lq)``, which must divide the BlockMask's Q block; a 120-token GQA prefill with
    ``G = 2`` (256 rows, 128-row blocks) otherwise fails to lower (NoValidChoicesError, torch 2.11). The main
    kernel handles those shapes.
    """
    q_block = 128 if block_mask is None else block_mask.BLOCK_SIZE[0]
    return {"FORCE_USE_FLEX_ATTENTION": True} if q.shape[-2] < 128 and q_block % decoding_rows(q, k) else {}


def kernel_options_for(
    q: Float[Tensor, "B Hq Tq D"], k: Float[Tensor, "B Hkv Tkv D"], block_mask: Optional[BlockMask]
) -> dict:
    """The ``kernel_options`` :func:`flex` passes to compiled FlexAttention on CUDA for these inputs.

    Forward tiles that divide the BlockMask's block sizes (:func:`forward_tiles`; capped below 128 queries at
    the flex-decoding kernel's own row tile) and, where that kernel has no valid tile, the main kernel instead
    (:func:`decode_kernel_options`). ``{}`` for blocks that are multiples of 128 and 128 queries or more. For a
    ``torch.compile(flex_attention)`` of your own::

        out = compiled(q, k, v, block_mask=bm, kernel_options=kernel_options_for(q, k, bm))

    (the backward's tiles need nothing per call: importing nsa_flex on a CUDA machine installs them).
    ``q`` and ``k`` are 4-D with a multiple of ``k``'s heads in ``q`` (only their shapes are read).
    """
    tensor("q", q, ndim=4)
    tensor("k", k, ndim=4)
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"q's heads must be a multiple of k's (GQA), got Hq={q.shape[1]}, Hkv={k.shape[1]}")
    _check_block_mask(block_mask)
    return {**forward_tiles(block_mask, q, k), **decode_kernel_options(q, k, block_mask)}


def _check_block_mask(block_mask) -> None:
    if block_mask is not None and not isinstance(block_mask, BlockMask):
        hint = (" (a mask_mod: call its .to_block_mask(q_len, kv_len, ...) and pass the result)"
                if callable(block_mask) else "")
        raise TypeError(f"block_mask must be a torch BlockMask or None, got {type(block_mask).__name__}{hint}")


def flex(
    q: Float[Tensor, "B Hq Tq D"],
    k: Float[Tensor, "B Hkv Tkv D"],
    v: Float[Tensor, "B Hkv Tkv Dv"],
    block_mask: Optional[BlockMask] = None,
    score_mod: Optional[Callable] = None,
    scale: Optional[float] = None,
    return_lse: bool = False,
    kernel_options: Optional[dict] = None,
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """``flex_attention(q, k, v, ...)`` with GQA enabled when ``Hq != Hkv``; returns ``out`` or ``(out, lse)``.

    ``block_mask`` is a torch ``BlockMask`` (e.g. ``mask.to_block_mask(...)``) or None. Rows that see no key
    give ``out = 0`` and ``lse = -inf``.
    """
    _check_block_mask(block_mask)
    score_mod_heads("score_mod", score_mod, q.shape[1])
    kwargs = dict(
        score_mod=score_mod,
        block_mask=block_mask,
        scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
        return_lse=return_lse,
    )
    if q.device.type == "cuda":
        kernel_options = {**kernel_options_for(q, k, block_mask), **(kernel_options or {})}
    if kernel_options:
        kwargs["kernel_options"] = kernel_options
    if q.device.type == "cuda" and not torch.compiler.is_compiling():
        enable_small_block_kernels()  # a no-op after the install on import (below)
    if q.device.type != "cuda" or torch.compiler.is_compiling():
        # Inside a user's torch.compile the call is traced into their graph and fused there.
        if q.device.type == "cuda":
            return _call(_fa.flex_attention, q, k, v, **kwargs)
        with _direct_cpu_flex():
            return _call(_fa.flex_attention, q, k, v, **kwargs)
    try:
        with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True, recompile_limit=RECOMPILE_LIMIT), \
                _gradients_laid_out_as_outputs():
            return _call(_compiled_flex(), q, k, v, **kwargs)
    except Exception as err:  # dynamo's own exception type moved between releases
        if "recompile" in type(err).__name__.lower() or "recompile_limit" in str(err):
            raise SlowPathError(
                f"compiled flex_attention hit dynamo's recompile limit ({RECOMPILE_LIMIT}); torch would now fall "
                "back to an unfused kernel that materializes Q x KV scores. Keep shapes stable (pad sequence "
                "lengths to a few buckets) or raise nsa_flex.functional.flex.RECOMPILE_LIMIT deliberately."
            ) from err
        raise


def _gradients_laid_out_as_outputs():
    """Compile the backward for incoming gradients laid out as the outputs are, not contiguous.

    FlexAttention's output has the query's layout; NSA modules hand it token-major ``[B, T, H, D]`` storage,
    and the gating backward writes each branch's gradient in its output's layout. AOTAutograd on torch 2.11
    (``guess_tangent_strides_as_outputs = False``) expects contiguous gradients and copies a token-major one
    before the backward kernel (1.4 ms of a 64k training step, paper config, H100); torch 2.13 already
    defaults to the layout of the outputs.
    """
    if not hasattr(functorch_config, "guess_tangent_strides_as_outputs"):
        return contextlib.nullcontext()
    return functorch_config.patch(guess_tangent_strides_as_outputs=True)


@contextlib.contextmanager
def _direct_cpu_flex():
    """Run CPU FlexAttention's unfused reference implementation directly.

    On CPU the unfused path is the one we want (exact; forward only). Left alone, eager ``flex_attention``
    still traces that implementation through dynamo for every new shape (about a second each, and it counts
    toward dynamo's recompile limit); torch's own debug switch calls it directly instead, which gives the same
    forward result in milliseconds. The switch is restored on exit.
    """
    previous = _fa._FLEX_ATTENTION_DISABLE_COMPILE_DEBUG
    _fa._FLEX_ATTENTION_DISABLE_COMPILE_DEBUG = True
    try:
        yield
    finally:
        _fa._FLEX_ATTENTION_DISABLE_COMPILE_DEBUG = previous


def needs_dense_path(*tensors: Tensor) -> bool:
    """True when gradients are needed on a device whose FlexAttention has no backward (the CPU)."""
    return torch.is_grad_enabled() and any(t.requires_grad and t.device.type != "cuda" for t in tensors)


# Installed on import where CUDA is present: inductor builds its choices object once per thread, and compiled
# backward passes are lowered on autograd's device threads, which a later call cannot reach (on an H100 the
# selection backward failed to lower after a compile that ran before the first flex call).
if torch.cuda.is_available():
    enable_small_block_kernels()
