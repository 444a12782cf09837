"""mean_pool (nsa_flex.functional.compress) against the float64 reference: values and gradients, for block sizes
the stride divides (sums of whole strides) and for any others (the unfolded view)."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from nsa_flex import functional as F
from nsa_flex import testing


@given(T=st.integers(0, 200), stride=st.integers(1, 16), ratio=st.sampled_from([1, 2, 3, 1.5]),
       dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16]), token_major=st.booleans(),
       seed=st.integers(0, 2**16))
def test_mean_pool_equals_reference_with_gradients(T, stride, ratio, dtype, token_major, seed):
    block = max(1, int(stride * ratio))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, T, 3, 8, generator=gen, dtype=torch.float64)
    x = x.transpose(1, 2) if token_major else x.transpose(1, 2).contiguous()
    x = x.to(dtype).requires_grad_()
    ref_x = x.detach().double().requires_grad_()
    out, ref = F.mean_pool(x, block, stride), testing.reference_mean_pool(ref_x, block, stride)
    assert out.shape == ref.shape and out.dtype == dtype
    if out.shape[2] == 0:  # no complete block: empty, and still connected to x (zero gradients)
        out.sum().backward()
        assert torch.equal(x.grad, torch.zeros_like(x))
        return
    atol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 2e-2}[dtype]
    tol = dict(rtol=0, atol=atol)
    torch.testing.assert_close(out.double(), ref, **tol)
    grad = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    out.backward(grad.to(dtype))
    ref.backward(grad)
    torch.testing.assert_close(x.grad.double(), ref_x.grad, **tol)
    if block % stride == 0:  # sums of whole strides: the gradient in x's layout, as the other branches give theirs
        (dx,) = torch.autograd.grad(F.mean_pool(x, block, stride), x, grad.to(dtype))  # not re-laid out as .grad
        assert dx.stride() == x.stride()


@pytest.mark.parametrize("x, error, match", [
    (torch.randn(2, 64, 4), ValueError, "x must have 4 dimensions"),  # had returned shape (2, 64, 1)
    (torch.ones(1, 1, 8, 4, dtype=torch.long), TypeError, "x must have a floating dtype"),  # had returned int64
])
def test_mean_pool_wants_floating_b_h_t_d(x, error, match):
    with pytest.raises(error, match=match):
        F.mean_pool(x, 4, 2)
