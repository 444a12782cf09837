"""testing.nsa_inputs: shapes, determinism across calls, the structured kind's local correlation, bad input."""

import pytest
import torch

from nsa_flex import testing


@pytest.mark.parametrize("kind", ["random", "structured"])
def test_shapes_and_determinism(kind):
    q, k, v, g = testing.nsa_inputs(50, 4, 2, 8, kind, batch=3, dtype=torch.float64, seed=7)
    assert q.shape == (3, 4, 50, 8) and k.shape == v.shape == (3, 2, 50, 8) and g.shape == (3, 4, 50, 3)
    assert q.dtype == torch.float64 and bool(((g >= 0) & (g < 1)).all())
    again = testing.nsa_inputs(50, 4, 2, 8, kind, batch=3, dtype=torch.float64, seed=7)
    assert all(torch.equal(a, b) for a, b in zip((q, k, v, g), again))


def test_structured_neighbours_are_alike():
    def neighbour_similarity(kind):
        k = testing.nsa_inputs(2048, 1, 1, 64, kind)[1][0, 0]
        return torch.nn.functional.cosine_similarity(k[1:], k[:-1], dim=-1).mean()

    assert neighbour_similarity("structured") > 0.5 > abs(neighbour_similarity("random"))


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(kind="smooth"), ValueError, "kind must be one of"),
    (dict(T=0), ValueError, "T"),
    (dict(heads=2.5), TypeError, "heads"),
    (dict(heads=3, kv_heads=2), ValueError, "heads must be a multiple of kv_heads"),  # had been accepted
    (dict(device="bogus"), ValueError, "device"),
    (dict(dtype=torch.long), TypeError, "dtype"),
    (dict(seed=1.5), TypeError, "seed"),  # had been torch's "manual_seed expected a long"
    (dict(seed=2**70), ValueError, "seed"),  # had been an unnamed overflow
])
def test_bad_arguments(kwargs, error, match):
    args = dict(T=10, heads=2, kv_heads=1, head_dim=4) | kwargs
    with pytest.raises(error, match=match):
        testing.nsa_inputs(**args)
