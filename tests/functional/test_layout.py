"""Token-major storage helpers (nsa_flex.functional.layout)."""

import torch
from hypothesis import given
from hypothesis import strategies as st

from nsa_flex.functional.layout import in_layout_of, rows_like


@given(B=st.integers(1, 2), H=st.integers(1, 3), T=st.integers(1, 5), D=st.integers(1, 4),
       token_major=st.booleans(), x_token_major=st.booleans(), batch_stride=st.integers(1, 1000))
def test_in_layout_of_views_alike_tensors_and_copies_others(B, H, T, D, token_major, x_token_major,
                                                             batch_stride):
    like = rows_like(torch.empty(B, T, H, D).transpose(1, 2) if token_major else torch.empty(B, H, T, D), D)
    x = rows_like(torch.empty(B, T, H, D).transpose(1, 2) if x_token_major else torch.empty(B, H, T, D), D)
    if B == 1:  # a batch stride of no meaning, as autograd may hand a B = 1 gradient on
        x = torch.empty_strided(x.shape, (batch_stride, *x.stride()[1:]))
    x.copy_(torch.randn(x.shape))
    got = in_layout_of(x, like)
    assert got.stride() == like.stride()
    torch.testing.assert_close(got, x, rtol=0, atol=0)
    # the same memory order wherever a dim has more than one element: a view, else a copy
    alike = all(a == b for a, b, n in zip(x.stride(), like.stride(), x.shape) if n > 1)
    assert (got.data_ptr() == x.data_ptr()) == alike
    assert alike or (token_major != x_token_major and H > 1 and T > 1)
