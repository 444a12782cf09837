"""Mask algebra: random compositions match dense attention, the Boolean laws hold on the dense form,
composition is the pointwise operation, repr parenthesizes by precedence (and evaluates back), extents merge."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from nsa_flex import masks
from nsa_flex.masks import Extent, Mask
from nsa_flex.testing import assert_matches_dense
from nsa_flex.testing import strategies as nst


def dense(m, shape, q_len=None, kv_len=None):
    return m.to_dense(q_len or shape.q_len, kv_len or shape.kv_len, B=shape.batch, H=shape.heads)


# -- random compositions vs dense attention -------------------------------------------------------------------
@given(shape=nst.shapes(same_length=True), data=st.data())
def test_random_compositions_match_dense_self_attention(shape, data):
    """Compositions of every generator, including layouts, documents with [B, T] ids, per-head layouts and
    fine_selection (B- and H-dependent)."""
    m = data.draw(nst.masks(shape.q_len, batch=shape.batch, heads=shape.heads))
    assert_matches_dense(m, shape.q_len, shape.kv_len, batch=shape.batch, heads=shape.heads,
                         kv_heads=shape.kv_heads, head_dim=shape.head_dim, block_size=shape.block_size)


@given(shape=nst.shapes(), data=st.data())
def test_random_length_free_compositions_match_dense_with_q_len_ne_kv_len(shape, data):
    m = data.draw(nst.masks())
    assert_matches_dense(m, shape.q_len, shape.kv_len, batch=shape.batch, heads=shape.heads,
                         kv_heads=shape.kv_heads, head_dim=shape.head_dim, block_size=shape.block_size)


# -- laws on the dense form ---------------------------------------------------------------------------------
@given(shape=nst.shapes(same_length=True, max_len=200), data=st.data())
def test_boolean_laws_on_dense_form(shape, data):
    draw = lambda: data.draw(nst.masks(shape.q_len, batch=shape.batch, heads=shape.heads, max_leaves=3))
    a, b, c = draw(), draw(), draw()
    A, B, C = dense(a, shape), dense(b, shape), dense(c, shape)
    # Composition is the pointwise Boolean operation on the dense forms.
    assert torch.equal(dense(a & b, shape), A & B)
    assert torch.equal(dense(a | b, shape), A | B)
    assert torch.equal(dense(~a, shape), ~A)
    # De Morgan
    assert torch.equal(dense(~(a & b), shape), dense(~a | ~b, shape))
    assert torch.equal(dense(~(a | b), shape), dense(~a & ~b, shape))
    # complement
    assert not dense(a & ~a, shape).any()
    assert dense(a | ~a, shape).all()
    assert torch.equal(dense(~~a, shape), A)
    # associativity, commutativity, distributivity
    assert torch.equal(dense((a & b) & c, shape), dense(a & (b & c), shape))
    assert torch.equal(dense(a | b, shape), dense(b | a, shape))
    assert torch.equal(dense(a & (b | c), shape), dense((a & b) | (a & c), shape))
    assert torch.equal(dense(a & (b | c), shape), A & (B | C))


@given(data=st.data(), q_len=nst.lengths(max_len=150), kv_len=nst.lengths(max_len=150))
def test_repr_evaluates_back_to_the_same_mask(data, q_len, kv_len):
    """The repr of a composition is a valid expression with the right precedence: eval gives the same mask."""
    m = data.draw(nst.masks())  # length-free masks have no tensor arguments, so their repr is evaluable
    rebuilt = eval(repr(m), vars(masks))
    assert repr(rebuilt) == repr(m)
    assert torch.equal(rebuilt.to_dense(q_len, kv_len), m.to_dense(q_len, kv_len))


# -- repr ---------------------------------------------------------------------------------------------------
def test_repr_precedence_and_parentheses():
    c, w, g, f = masks.causal(), masks.sliding_window(8), masks.global_tokens(2), masks.full()
    assert repr(c & w | g) == "causal() & sliding_window(8) | global_tokens(2)"
    assert repr(c & (w | g)) == "causal() & (sliding_window(8) | global_tokens(2))"
    assert repr((c | w) & g) == "(causal() | sliding_window(8)) & global_tokens(2)"
    assert repr(c | w & g) == "causal() | sliding_window(8) & global_tokens(2)"
    assert repr(~c) == "~causal()"
    assert repr(~(c & w)) == "~(causal() & sliding_window(8))"
    assert repr(~c & w) == "~causal() & sliding_window(8)"
    assert repr(~~c) == "~~causal()"
    # left-associative: only a right operand of equal precedence needs parentheses
    assert repr((c & w) & g) == "causal() & sliding_window(8) & global_tokens(2)"
    assert repr(c & (w & g)) == "causal() & (sliding_window(8) & global_tokens(2))"
    assert repr((c | w) | (g | f)) == "causal() | sliding_window(8) | (global_tokens(2) | full())"


def test_design_example_reads_as_written():
    m = masks.causal() & masks.sliding_window(256) | masks.global_tokens(4)
    assert repr(m) == "causal() & sliding_window(256) | global_tokens(4)"
    t, j = torch.arange(300).view(-1, 1), torch.arange(300).view(1, -1)
    want = ((j <= t) & (t - 256 < j)) | (t < 4) | (j < 4)
    assert torch.equal(m.to_dense(300, 300)[0, 0], want)


# -- plain mask_mods compose too ---------------------------------------------------------------------------
def even_keys(b, h, q_idx, kv_idx):
    return kv_idx % 2 == 0


def test_plain_functions_compose_on_either_side():
    c = masks.causal()
    for m, name in [(c & even_keys, "causal() & even_keys"), (even_keys & c, "even_keys & causal()"),
                    (even_keys | c, "even_keys | causal()"), (Mask(even_keys), "even_keys")]:
        assert isinstance(m, Mask) and repr(m) == name
    t, j = torch.arange(40).view(-1, 1), torch.arange(40).view(1, -1)
    assert torch.equal((even_keys & c).to_dense(40, 40)[0, 0], (j <= t) & (j % 2 == 0))
    assert_matches_dense(even_keys & c, 40, 40, block_size=16)
    assert_matches_dense(Mask(even_keys, name="evens"), 33, 71, block_size=(16, 32))
    assert repr(Mask(even_keys, name="evens")) == "evens"


def test_a_mask_is_a_mask_mod():
    m = masks.sliding_window(3) & masks.causal()
    b, h = torch.tensor(0), torch.tensor(0)
    assert bool(m(b, h, torch.tensor(5), torch.tensor(3)))
    assert not bool(m(b, h, torch.tensor(5), torch.tensor(2)))
    from torch.nn.attention.flex_attention import create_block_mask

    bm = create_block_mask(m, None, None, 64, 64, device="cpu", BLOCK_SIZE=16)
    assert bm.shape[-2:] == (64, 64)


# -- extents ------------------------------------------------------------------------------------------------
def test_composition_merges_extents():
    doc = masks.document(torch.zeros(3, 50, dtype=torch.long))
    per_head = masks.bigbird(64, num_heads=2, different_layout_per_head=True)
    m = doc & masks.causal() | ~per_head
    assert m.extent.batch == 3 and m.extent.heads == 2
    assert m.to_dense(50, 50).shape == (3, 2, 50, 50)
    # every part's length checks are kept: the layout needs q_len == kv_len, the ids cover 50 tokens
    with pytest.raises(ValueError, match="q_len == kv_len"):
        m.to_dense(40, 41)
    with pytest.raises(ValueError, match="ids for 50 tokens"):
        m.to_dense(60, 60)


def test_batch_mismatch_when_composing():
    doc = masks.document(torch.zeros(2, 10, dtype=torch.long))
    prefix = masks.prefix_lm(torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="batch=2 and batch=3"):
        doc & prefix
    with pytest.raises(ValueError, match="batch"):
        prefix | doc


def test_heads_mismatch_when_composing():
    a = masks.block_layout(torch.ones(2, 4, 4, dtype=torch.bool), 16)
    b = masks.block_layout(torch.ones(3, 4, 4, dtype=torch.bool), 16)
    with pytest.raises(ValueError, match="heads=2 and heads=3"):
        a & b


def test_mask_of_non_callable_is_type_error():
    with pytest.raises(TypeError, match="fn"):
        Mask(3)
    with pytest.raises(TypeError, match="fn"):
        masks.causal() & "causal"


def test_to_dense_of_a_mask_mod_that_returns_no_bool_raises():
    """``q - k`` (a forgotten comparison) had come back as an int64 "mask"; nonzero is not read as True."""
    with pytest.raises(TypeError, match="mask_mod <lambda> must return a bool tensor.*int64"):
        Mask(lambda b, h, q, k: q - k).to_dense(4, 4)
    assert Mask(lambda b, h, q, k: q >= k).to_dense(4, 4).dtype == torch.bool


@pytest.mark.parametrize("block_size, error", [
    (8.0, TypeError),  # had raised "'float' object is not iterable"
    ("8", TypeError),
    ((8, 8.0), TypeError),
    ((8, 8, 8), TypeError),
    (True, TypeError),
    (0, ValueError),
    ((16, 0), ValueError),
])
def test_to_block_mask_block_size_names_the_argument(block_size, error):
    with pytest.raises(error, match="block_size"):
        masks.causal().to_block_mask(16, 16, block_size=block_size)


@pytest.mark.parametrize("materialize", [
    lambda m, device: m.to_dense(8, 8, device=device),
    lambda m, device: m.to_block_mask(8, 8, device=device),
])
def test_a_device_torch_cannot_use_names_device(materialize):
    with pytest.raises(ValueError, match="device must be a valid device string"):
        materialize(masks.causal(), "bogus")
    if not torch.cuda.is_available():  # had been torch's AssertionError / a long dynamo error
        with pytest.raises(ValueError, match="device='cuda' but CUDA is not available"):
            materialize(masks.causal(), "cuda")


@pytest.mark.parametrize("q_len, kv_len, B, H, device, compiled", [
    (2048, 2048, None, None, "cuda", False),  # 2**22 entries: the whole mask is 4 MiB, built eagerly
    (2048, 2049, None, None, "cuda", True),
    (1024, 1024, 2, 2, "cuda", False), (1024, 1024, 4, 2, "cuda", True),  # batch and heads count
    (65536, 65536, None, None, "cpu", False),  # inductor's CPU codegen fails for Q != KV: always eager
])
def test_cuda_block_masks_compile_only_above_a_few_million_entries(monkeypatch, q_len, kv_len, B, H, device,
                                                                   compiled):
    """Compiling create_block_mask costs seconds per mask and shape; below EAGER_BLOCK_MASK_ENTRIES the whole
    boolean mask is cheaper (the GPU tests check the compiled build against the eager one above it)."""
    from nsa_flex.masks import mask as mask_module

    calls = []
    monkeypatch.setattr(mask_module, "create_block_mask", lambda *args, **kwargs: calls.append(kwargs["_compile"]))
    mask_module.build_block_mask(masks.causal(), q_len, kv_len, B, H, device, (128, 128))
    assert calls == [compiled]


@pytest.mark.parametrize("build, fragment", [
    (lambda: masks.prefix_lm(torch.tensor([], dtype=torch.long)), "prefix_len as a tensor needs one length"),
    (lambda: masks.document(torch.zeros(0, 5, dtype=torch.long)), "document_ids must not be empty"),
    (lambda: masks.document(torch.zeros(0, dtype=torch.long)), "document_ids must not be empty"),
    (lambda: masks.fine_selection(torch.zeros(1, 1, 4, 0, dtype=torch.long)), r"\(B, Hkv, n >= 1\)"),
    (lambda: masks.fine_selection(torch.zeros(0, 1, 4, 2, dtype=torch.long)), r"\(B, Hkv, n >= 1\)"),
])
def test_empty_data_is_refused_when_the_mask_is_built(build, fragment):
    """A batch of 0 read as "any batch", and an empty slot list, had failed later with IndexError."""
    with pytest.raises(ValueError, match=fragment):
        build()


def test_renaming_a_mask_keeps_its_extent_and_adds_the_given_one():
    per_batch = masks.prefix_lm(torch.tensor([1, 2]))
    renamed = Mask(per_batch, "prefix2", Extent(heads=4))
    assert renamed.extent.batch == 2 and renamed.extent.heads == 4 and repr(renamed) == "prefix2"
    with pytest.raises(ValueError, match="H=4, got H=3"):
        renamed.to_dense(4, 4, H=3)
    with pytest.raises(ValueError, match="cannot combine masks defined for batch=2 and batch=3"):
        Mask(per_batch, "b3", Extent(batch=3))


def test_a_device_other_than_the_masks_own_is_refused():
    """The mask_mod reads its tensors where they are: asked for elsewhere, it had returned a tensor on the mask's
    device (or on the asked one, unreadable) without a word."""
    ids = masks.document(torch.tensor([0, 0, 1, 1]))
    assert ids.to_dense(4, 4, device="cpu").device.type == "cpu"
    with pytest.raises(ValueError, match="device='meta' but document.* holds its tensors on cpu"):
        ids.to_dense(4, 4, device="meta")
    with pytest.raises(ValueError, match="holds its tensors on meta"):
        masks.fixed(64, device="meta").to_block_mask(64, 64, device="cpu")


def test_dilated_with_a_reach_past_int64_is_the_unbounded_dilated_window():
    far, near = masks.dilated(2**62, 4).to_dense(40, 40), masks.dilated(10, 4).to_dense(40, 40)
    assert torch.equal(far, near)  # every key of 40 is within both reaches
