"""compressed_causal: dense form == the definition in docs/design.md, number of compressed keys == a brute-force count,
flex == float64 dense with Q_LEN != KV_LEN, rows before the first complete block give 0, argument errors."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from nsa_flex import masks
from nsa_flex.testing import assert_matches_dense
from nsa_flex.testing import strategies as nst


@st.composite
def compression(draw):
    d = draw(st.integers(1, 32))
    l = draw(st.integers(d, 64))
    return l, d


@given(shape=nst.shapes(), ld=compression(), data=st.data())
def test_compressed_causal_matches_definition_and_dense(shape, ld, data):
    l, d = ld
    q_len = shape.q_len
    # The natural key count for q_len tokens when there is one, else any length (the mask is index arithmetic).
    natural = masks.num_compressed_blocks(q_len, l, d)
    kv_len = data.draw(st.sampled_from([natural, shape.kv_len])) if natural else shape.kv_len
    m = masks.compressed_causal(block_size=l, stride=d)
    t = np.arange(q_len).reshape(-1, 1)
    c = np.arange(kv_len).reshape(1, -1)
    want = c * d + l - 1 <= t  # compressed key c covers tokens [c*d, c*d + l)
    np.testing.assert_array_equal(m.to_dense(q_len, kv_len)[0, 0].numpy(), want)
    assert_matches_dense(m, q_len, kv_len, batch=shape.batch, heads=shape.heads, kv_heads=shape.kv_heads,
                         head_dim=shape.head_dim, block_size=shape.block_size)


@given(T=st.integers(0, 400), ld=compression())
def test_num_compressed_blocks_counts_complete_blocks(T, ld):
    l, d = ld
    brute = sum(1 for c in range(T + 1) if c * d + l <= T)  # blocks [c*d, c*d + l) inside [0, T)
    assert masks.num_compressed_blocks(T, l, d) == brute


def test_small_example():
    # l=4, d=2, 16 tokens -> 7 compressed blocks starting at 0, 2, ..., 12 (docs/design.md "Exact semantics").
    assert masks.num_compressed_blocks(16, 4, 2) == 7
    dense = masks.compressed_causal(block_size=4, stride=2).to_dense(16, 7)[0, 0]
    assert not dense[:3].any()  # t < l - 1 sees nothing
    assert dense[3].tolist() == [True] + [False] * 6
    assert dense[15].all()
    assert dense.sum(-1).tolist() == [0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7]


def test_rows_before_the_first_block_give_zero():
    m = masks.compressed_causal(block_size=32, stride=16)
    assert not m.to_dense(100, 5)[0, 0, :31].any()
    assert_matches_dense(m, 100, masks.num_compressed_blocks(100, 32, 16), block_size=(16, 16))


def test_repr():
    assert repr(masks.compressed_causal()) == "compressed_causal(block_size=32, stride=16)"
    assert repr(masks.compressed_causal(block_size=8, stride=8)) == "compressed_causal(block_size=8, stride=8)"


@pytest.mark.parametrize(
    "make, exc, names",
    [
        (lambda: masks.compressed_causal(block_size=0, stride=1), ValueError, "block_size"),
        (lambda: masks.compressed_causal(block_size=16, stride=0), ValueError, "stride"),
        (lambda: masks.compressed_causal(block_size=16, stride=32), ValueError, "stride must be <= block_size"),
        (lambda: masks.compressed_causal(block_size=16.0, stride=8), TypeError, "block_size"),
        (lambda: masks.compressed_causal(block_size=16, stride=-8), ValueError, "stride"),
        # num_compressed_blocks(8, 0, 2) had returned 5, (8.5, 4, 2) 3.0 and (8, 4, 0) a ZeroDivisionError
        (lambda: masks.num_compressed_blocks(8, 0, 2), ValueError, "block_size"),
        (lambda: masks.num_compressed_blocks(8, 4, 0), ValueError, "stride"),
        (lambda: masks.num_compressed_blocks(8, 4, 8), ValueError, "stride must be <= block_size"),
        (lambda: masks.num_compressed_blocks(8.5, 4, 2), TypeError, "seq_len"),
        (lambda: masks.num_compressed_blocks(-1, 4, 2), ValueError, "seq_len"),
    ],
)
def test_bad_arguments_name_the_argument(make, exc, names):
    with pytest.raises(exc, match=names):
        make()
