"""The Hypothesis strategies draw what they promise (and reach the interesting cases)."""

import re

import pytest
import torch
from hypothesis import find, given, settings
from hypothesis import strategies as st

from nsa_flex import masks
from nsa_flex.functional import selection
from nsa_flex.testing import strategies as nst


@given(nst.shapes())
def test_shapes_are_valid(s):
    assert s.heads % s.kv_heads == 0 and s.group_size == s.heads // s.kv_heads
    assert 1 <= s.q_len <= 300 and 1 <= s.kv_len <= 300
    assert s.q_block_size in (16, 32, 64, 128) and s.kv_block_size in (16, 32, 64, 128)
    assert s.block_size == (s.q_block_size, s.kv_block_size)
    assert s.batch >= 1 and s.head_dim >= 1


@given(nst.shapes(same_length=True, square_blocks=True, max_len=50))
def test_shape_options(s):
    assert s.q_len == s.kv_len <= 50 and s.q_block_size == s.kv_block_size


def test_shapes_reach_interesting_cases():
    quick = settings(max_examples=2000, database=None, derandomize=True)
    find(nst.shapes(), lambda s: s.group_size > 1 and s.kv_heads > 1, settings=quick)  # GQA
    find(nst.shapes(), lambda s: s.q_len != s.kv_len, settings=quick)
    find(nst.shapes(), lambda s: s.q_len % 2 == 1 and s.q_len > 128, settings=quick)  # odd, several blocks
    find(nst.shapes(), lambda s: s.q_block_size != s.kv_block_size, settings=quick)
    find(nst.shapes(), lambda s: s.q_len % s.q_block_size and s.kv_len % s.kv_block_size, settings=quick)


@given(st.data(), st.integers(1, 120))
def test_masks_without_seq_len_work_for_any_lengths(data, kv_len):
    m = data.draw(nst.masks())
    assert isinstance(m, masks.Mask)
    assert m.extent.batch is None and m.extent.heads is None
    assert m.to_dense(77, kv_len).shape == (1, 1, 77, kv_len)


@given(st.data(), nst.lengths(max_len=200))
def test_masks_with_seq_len_batch_heads(data, T):
    m = data.draw(nst.masks(T, batch=2, heads=4))
    assert isinstance(m, masks.Mask)
    assert m.extent.batch in (None, 2) and m.extent.heads in (None, 4)
    assert m.to_dense(T, T, B=2, H=4).shape == (2, 4, T, T)


def test_masks_reach_every_kind_of_leaf():
    seen = set()

    @settings(max_examples=400, database=None, derandomize=True)
    @given(nst.masks(100, batch=2, heads=4))
    def draw(m):
        text = repr(m)
        seen.update(name for name in LEAVES if re.search(rf"\b{name}\(", text))
        if " & " in text and " | " in text and "~" in text:
            seen.add("&|~")
        if m.extent.heads == 4:
            seen.add("per-head")
        if m.extent.batch == 2:
            seen.add("per-batch")

    draw()
    assert seen == set(LEAVES) | {"&|~", "per-head", "per-batch"}


LEAVES = ["causal", "full", "sliding_window", "chunked", "dilated", "global_tokens", "prefix_lm", "compressed_causal",
          "document", "fixed", "variable", "bigbird", "longformer", "block_layout", "fine_selection", "neighborhood"]


@given(st.integers(1, 2), st.integers(1, 3), st.integers(1, 70), st.integers(1, 6), st.integers(1, 9), st.data())
def test_block_indices_are_valid(B, Hkv, T, n, nkv, data):
    idx = data.draw(nst.block_indices(B, Hkv, T, n, nkv))
    assert idx.dtype == torch.int64 and idx.shape == (B, Hkv, T, n)
    assert idx.min() >= -1 and idx.max() < nkv
    masks.fine_selection(idx, block_size=16).to_dense(T, nkv * 16)  # accepted by the mask


def test_block_indices_reach_unused_slots_and_duplicates():
    quick = settings(max_examples=500, database=None, derandomize=True)
    strat = nst.block_indices(1, 2, 40, 4, 8)

    def has_duplicates(idx):
        s = idx.sort(-1).values
        return bool(((s[..., 1:] == s[..., :-1]) & (s[..., 1:] >= 0)).any())

    find(strat, lambda idx: bool((idx == -1).any()), settings=quick)
    find(strat, has_duplicates, settings=quick)
    find(strat, lambda idx: bool((idx == -1).all(-1).any()), settings=quick)  # a token that selected nothing
    find(strat, lambda idx: not bool((idx == -1).any()), settings=quick)


def test_lengths_cover_block_edges():
    quick = settings(max_examples=2000, database=None, derandomize=True)
    for n in (127, 128, 129):
        find(nst.lengths(), lambda x, n=n: x == n, settings=quick)


def _scores_decide(case) -> bool:
    """Whether the last token's choice is (partly) by score: it has compressed keys to score with, free slots
    after its forced blocks, and more unforced blocks than free slots."""
    cfg, T = case["cfg"], case["T"]
    if T < cfg["compress_block_size"]:
        return False
    own = (T - 1) // cfg["selection_block_size"]
    forced = {s for s in [*range(cfg["num_initial"]), *(own - i for i in range(cfg["num_local"]))] if 0 <= s <= own}
    free = cfg["num_selected"] - min(cfg["num_selected"], len(forced))
    return 0 < free < own + 1 - len(forced)


@given(nst.nsa_cases())
def test_nsa_cases_are_valid(case):
    cfg = case["cfg"]
    assert case["Hq"] % case["Hkv"] == 0 and 1 <= case["T"] <= 140
    selection.check_selection(cfg["compress_block_size"], cfg["compress_stride"], cfg["selection_block_size"],
                              cfg["num_selected"], cfg["num_initial"], cfg["num_local"])
    assert cfg["window_size"] >= 1


def test_nsa_cases_mostly_leave_the_choice_to_scores_and_reach_edge_cases():
    """Where no choice is by score a ranking bug goes unseen, so most draws must leave one. Also reached: GQA
    ratios that are not powers of two, l % d != 0, no compressed key at all, num_selected past the blocks."""
    decided = []

    @settings(max_examples=300, database=None, derandomize=True)
    @given(nst.nsa_cases())
    def draw(case):
        decided.append(_scores_decide(case))

    draw()
    assert sum(decided) / len(decided) > 0.6
    quick = settings(max_examples=500, database=None, derandomize=True)
    find(nst.nsa_cases(), lambda c: c["Hq"] // c["Hkv"] == 3 and c["Hkv"] == 2, settings=quick)
    find(nst.nsa_cases(), lambda c: c["Hq"] // c["Hkv"] == 6, settings=quick)
    find(nst.nsa_cases(), lambda c: c["cfg"]["compress_block_size"] % c["cfg"]["compress_stride"], settings=quick)
    find(nst.nsa_cases(), lambda c: c["T"] < c["cfg"]["compress_block_size"], settings=quick)
    find(nst.nsa_cases(), lambda c: c["cfg"]["num_selected"] > -(-c["T"] // c["cfg"]["selection_block_size"]),
         settings=quick)


@pytest.mark.parametrize("low, high", [(4, 4), (7, 7), (64, 65)])
def test_lengths_in_a_range_of_one_or_two(low, high):
    """An even single length has no odd one to draw: the strategies must still give it (they had raised)."""

    @settings(max_examples=10, database=None)
    @given(n=nst.lengths(low, high), shape=nst.shapes(min_len=low, max_len=high))
    def draw(n, shape):
        assert low <= n <= high and low <= shape.q_len <= high

    draw()
