"""nsa_attention's argument checks that name the argument (fine_qk, scale); the numerics are in test_nsa.py."""

import pytest
import torch

from nsa_flex import functional as F
from nsa_flex import testing

CFG = dict(compress_block_size=4, compress_stride=2, selection_block_size=4, num_selected=2, window_size=4)


@pytest.mark.parametrize("fine_qk, error, match", [
    (("q",), TypeError, r"fine_qk must be a pair.*a tuple of length 1"),  # had been an IndexError
    (("q", "q", "k"), TypeError, "fine_qk must be a pair"),
    (("q", None), TypeError, r"fine_qk\[1\] must be a torch.Tensor"),
    (("q", "q"), ValueError, r"fine_qk\[1\] must have shape"),  # k has 1 head, q 2
])
def test_fine_qk(fine_qk, error, match):
    q, k, v, gates = testing.nsa_inputs(16, 2, 1, 4)
    named = {"q": q, "k": k, None: None}
    with pytest.raises(error, match=match):
        F.nsa_attention(q, k, v, gates, fine_qk=tuple(named[x] for x in fine_qk), **CFG)


@pytest.mark.parametrize("scale, error", [("a", TypeError), (True, TypeError), (0.0, ValueError),
                                          (-1.0, ValueError), (float("inf"), ValueError)])
def test_scale(scale, error):
    """scale='a' had raised torch's TypeError from inside an einsum, not naming scale."""
    q, k, v, gates = testing.nsa_inputs(16, 2, 1, 4)
    with pytest.raises(error, match="scale"):
        F.nsa_attention(q, k, v, gates, scale=scale, **CFG)
