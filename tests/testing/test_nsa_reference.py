"""reference_nsa refuses what nsa_attention refuses (its argument checks are nsa_attention's)."""

import pytest
import torch

from nsa_flex import functional as F
from nsa_flex import testing

CFG = dict(compress_block_size=4, compress_stride=2, selection_block_size=4, num_selected=2, window_size=4)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(window_size=0), ValueError, "window_size"),  # had been accepted
    (dict(compress_stride=8), ValueError, "stride"),
    (dict(selection_block_size=3), ValueError, "selection_block_size"),
    (dict(scale="a"), TypeError, "scale"),
    (dict(fine_qk="qk"), TypeError, "fine_qk"),
])
def test_reference_nsa_and_nsa_attention_refuse_alike(kwargs, error, match):
    q, k, v, gates = testing.nsa_inputs(16, 2, 1, 4, dtype=torch.float64)
    for fn in (testing.reference_nsa, F.nsa_attention):
        with pytest.raises(error, match=match):
            fn(q, k, v, gates, **(CFG | kwargs))


def test_reference_nsa_checks_shapes():
    q, k, v, gates = testing.nsa_inputs(16, 3, 1, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="gates"):
        testing.reference_nsa(q, k, v, gates[..., :2], **CFG)
    with pytest.raises(ValueError, match="kv heads"):
        testing.reference_nsa(q, torch.cat([k, k], 1), torch.cat([v, v], 1), gates, **CFG)
