"""The shared argument checks of nsa_flex._checks that the layers' own tests reach only in part."""

import math

import numpy as np
import pytest
import torch

from nsa_flex import _checks


@pytest.mark.parametrize("value, kwargs, want", [
    (2, {}, 2.0), (np.float32(0.5), dict(greater_than=0), 0.5), (0, dict(at_least=0), 0.0),
])
def test_number_accepts(value, kwargs, want):
    assert _checks.number("x", value, **kwargs) == want


@pytest.mark.parametrize("value, kwargs, error", [
    (True, {}, TypeError), ("1", {}, TypeError), (torch.tensor(1.0), {}, TypeError),
    (math.nan, {}, ValueError), (math.inf, {}, ValueError),
    (0, dict(greater_than=0), ValueError), (1.0, dict(greater_than=1), ValueError),
    (-1e-9, dict(at_least=0), ValueError),
])
def test_number_refuses(value, kwargs, error):
    with pytest.raises(error, match="x must be a finite number"):
        _checks.number("x", value, **kwargs)


def test_block_and_stride_names_the_callers_arguments():
    assert _checks.block_and_stride(4, 4) == (4, 4)
    with pytest.raises(ValueError, match="compress_stride must be <= compress_block_size"):
        _checks.block_and_stride(4, 8, "compress_block_size", "compress_stride")


def test_device():
    assert _checks.device("device", None) is None
    assert _checks.device("device", "cpu") == torch.device("cpu")
    assert _checks.device("device", torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(ValueError, match="device must be a valid device string"):
        _checks.device("device", "bogus")
    with pytest.raises(TypeError, match="device"):
        _checks.device("device", 0)


def test_device_cuda_where_cuda_is_missing_or_smaller(monkeypatch):
    """Without CUDA (patched so the test means the same on any machine) and with fewer devices than named."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="device='cuda' but CUDA is not available"):
        _checks.device("device", "cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert _checks.device("device", "cuda:0") == torch.device("cuda", 0)
    with pytest.raises(ValueError, match="device='cuda:1' but only 1 CUDA device"):
        _checks.device("device", "cuda:1")


def test_floating_dtype_and_score_mod_heads():
    assert _checks.floating_dtype("dtype", torch.bfloat16) is torch.bfloat16
    for bad in (torch.int32, "float32", float):
        with pytest.raises(TypeError, match="dtype"):
            _checks.floating_dtype("dtype", bad)
    _checks.score_mod_heads("score_mod", lambda s, b, h, q, k: s, 3)  # a plain function is defined for any heads
    with pytest.raises(ValueError, match="defined for 2 heads, got 3"):
        _checks.score_mod_heads("score_mod", type("Mod", (), {"num_heads": 2})(), 3)


def test_ints_past_int64_are_refused_by_name():
    """Python ints beyond int64 used to pass and overflow later inside torch (an OverflowError naming nothing)."""
    assert _checks.positive_int("window_size", _checks.INT64_MAX) == _checks.INT64_MAX
    with pytest.raises(ValueError, match=r"window_size must be an int <= 2\*\*63 - 1"):
        _checks.positive_int("window_size", _checks.INT64_MAX + 1)


@pytest.mark.parametrize("value, error", [(-1, ValueError), (2**64, ValueError), (1.5, TypeError), ("7", TypeError),
                                          (True, TypeError)])
def test_seed_is_an_int64_at_least_zero(value, error):
    assert _checks.seed("seed", 0) == 0 and _checks.seed("seed", 2**63 - 1) == 2**63 - 1
    with pytest.raises(error, match="seed"):
        _checks.seed("seed", value)


@pytest.mark.parametrize("name", ["xpu", "mps"])
def test_device_this_torch_cannot_use(monkeypatch, name):
    """Any device type, not only CUDA: torch's module for it says whether it can be used (patched to say no)."""
    backend = torch.backends.mps if name == "mps" else getattr(torch, name)
    monkeypatch.setattr(backend, "is_available", lambda: False)
    with pytest.raises(ValueError, match=f"this torch cannot use {name} devices"):
        _checks.device("device", name)
