"""Property-test a new sparsity strategy with nsa_flex.testing and Hypothesis.

Shows how a user who invents a pattern checks it: write the mask_mod, wrap it in ``Mask`` (so it composes and
prints), then let Hypothesis draw attention shapes (GQA head counts, odd lengths, non-square FlexAttention
blocks) and check that FlexAttention with the mask's BlockMask equals float64 dense attention
(``assert_matches_dense``), plus structural properties through the mask algebra. On a GPU, pass
``device="cuda", dtype=torch.bfloat16, gradients=True`` to check the compiled kernels and their backward too
(FlexAttention has no CPU backward).

The strategy here is the Sparse Transformer "strided" pattern: query ``t`` sees the previous ``stride`` keys
and every ``stride``-th key before them, ``0 <= t - j < stride or (t - j) % stride == 0``.

Run directly:    python examples/property_test_new_strategy.py
or with pytest:  python -m pytest -q examples/property_test_new_strategy.py
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from nsa_flex import masks
from nsa_flex.testing import assert_matches_dense
from nsa_flex.testing import strategies as nst


def strided(stride: int) -> masks.Mask:
    """The user's new strategy as a Mask: local band of ``stride`` keys + every ``stride``-th earlier key."""
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise ValueError(f"stride must be a positive int, got {stride!r}")

    def strided(b, h, q_idx, kv_idx):
        diff = q_idx - kv_idx
        return (diff >= 0) & ((diff < stride) | (diff % stride == 0))

    return masks.Mask(strided, name=f"strided({stride})")


EXAMPLES = settings(max_examples=20, deadline=None)


@EXAMPLES
@given(shape=nst.shapes(same_length=True, max_len=200), stride=st.integers(1, 48))
def test_strided_matches_dense_attention(shape: nst.Shape, stride: int) -> None:
    """FlexAttention with strided(s)'s BlockMask == float64 dense attention, for any shape and block size."""
    assert_matches_dense(
        strided(stride),
        shape.q_len,
        shape.kv_len,
        batch=shape.batch,
        heads=shape.heads,
        kv_heads=shape.kv_heads,
        head_dim=shape.head_dim,
        block_size=shape.block_size,
    )


@EXAMPLES
@given(seq_len=nst.lengths(max_len=200), stride=st.integers(1, 48))
def test_strided_structure(seq_len: int, stride: int) -> None:
    """Causal, contains the local window of ``stride`` keys, and is a band for stride >= seq_len."""
    m = strided(stride)
    assert not (m & ~masks.causal()).to_dense(seq_len, seq_len).any(), "sees the future"
    assert not (masks.sliding_window(stride) & ~m).to_dense(seq_len, seq_len).any(), "misses its local band"
    if stride >= seq_len:
        assert (m.to_dense(seq_len, seq_len) == masks.causal().to_dense(seq_len, seq_len)).all()


@EXAMPLES
@given(shape=nst.shapes(same_length=True, max_len=160), stride=st.integers(1, 32), window=st.integers(1, 64))
def test_strided_composes_with_library_masks(shape: nst.Shape, stride: int, window: int) -> None:
    """Compositions with library masks stay exact too (e.g. strided within a window, plus attention sinks)."""
    m = strided(stride) & masks.sliding_window(window) | masks.causal() & masks.global_tokens(2)
    assert_matches_dense(m, shape.q_len, shape.kv_len, heads=shape.heads, kv_heads=shape.kv_heads,
                         block_size=shape.block_size)


if __name__ == "__main__":
    tests = (test_strided_matches_dense_attention, test_strided_structure, test_strided_composes_with_library_masks)
    for test in tests:
        test()  # a @given test called directly runs its whole Hypothesis search
        print(f"{test.__name__}: passed ({EXAMPLES.max_examples} examples)")
