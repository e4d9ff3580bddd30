"""The attention's building blocks for long memories: cached step tables, the banded (O(M N)) look-ahead
position scores, the one-pass softmax / log-sum-exp, memories that keep only their own rows, M up to 16 N,
and generation that computes only the logits it samples from."""
import pytest
import torch

from lamemo_parallel.positions import (lookahead_distances, lookahead_position_scores, lookahead_table_row,
                                       lookahead_window, step_tables)
from lamemo_parallel.softmax import softmax_with_lse
from lamemo_parallel.generation import generate
from helpers import tiny_model
from spec_reference import SpecModel
from test_model_properties import run_segments


def make_model(variant=3, seed=0, **overrides):
    return tiny_model(37, variant=variant, seed=seed, **overrides)


# ---------------------------------------------------------------------------------------------- window positions
SHAPES = [(1, 5), (3, 5), (5, 5), (7, 4), (8, 4), (16, 4), (17, 4), (64, 4), (33, 2), (12, 1)]
# variant 33 needs M >= N (its error is tested in test_model_reference)
WINDOW_CASES = [(v, m, n) for v in (3, 31, 32, 33) for m, n in SHAPES if not (v == 33 and m < n)]


@pytest.mark.parametrize("variant,mem_len,seg_len", WINDOW_CASES)
def test_banded_lookahead_scores_equal_a_gather_from_the_whole_table(variant, mem_len, seg_len):
    """The banded scores (O(M N)) equal scoring every memory row against the whole table (O(M^2)) and picking
    each window key's distance, at every unmasked (row, key); masked entries are finite."""
    torch.manual_seed(mem_len * 100 + seg_len)
    B, H, dh = 2, 3, 4
    K = 2 * mem_len if variant == 33 else mem_len
    q = torch.randn(B, H, mem_len, dh, dtype=torch.float64)
    table = torch.randn(K, H, dh, dtype=torch.float64)
    plan = step_tables(mem_len, seg_len, variant, torch.device("cpu")).lookahead
    start, end = lookahead_window(mem_len, seg_len)
    assert (plan.start, plan.end) == (start, end) and plan.width == min(mem_len, seg_len)
    got = lookahead_position_scores(q, table, plan)
    assert got.shape == (B, H, mem_len, end - start) and torch.isfinite(got).all()

    delta = lookahead_distances(mem_len, start, end)                         # [M, W]: p - i
    rows = lookahead_table_row(delta, mem_len, variant)
    full = torch.einsum("bhid,khd->bhik", q, table)                          # every row x every distance
    expected = torch.gather(full, 3, rows.clamp(min=0).expand(B, H, -1, -1))
    allowed = (delta > 0) if variant != 33 else torch.ones_like(delta, dtype=torch.bool)
    assert (rows[allowed] >= 0).all()                                        # every allowed key has a distance
    torch.testing.assert_close(got[..., allowed], expected[..., allowed], rtol=1e-12, atol=1e-12)
    if plan.future_blocked is not None:
        assert torch.equal(plan.future_blocked, ~allowed)


def test_lookahead_cost_is_linear_in_memory():
    """Each block of memory rows scores width + block - 1 table rows: M x (2N - 1) at most, not M x M."""
    for mem_len, seg_len in [(1024, 64), (2048, 128), (96, 96), (40, 64)]:
        plan = step_tables(mem_len, seg_len, 3, torch.device("cpu")).lookahead
        if mem_len <= seg_len:
            assert plan.whole_table                                           # M x M = M x width
        else:
            assert plan.table_index.shape[1] <= 2 * plan.width - 1            # table rows a block scores
            assert plan.n_blocks * plan.block < mem_len + plan.block          # rows scored (with padding)


# ---------------------------------------------------------------------------------------------- cached tables
def test_step_tables_are_built_once_per_shape_and_device():
    cpu, meta = torch.device("cpu"), torch.device("meta")
    a = step_tables(12, 4, 3, cpu)
    assert step_tables(12, 4, 3, cpu) is a
    assert step_tables(12, 5, 3, cpu) is not a and step_tables(12, 4, 33, cpu) is not a
    on_meta = step_tables(12, 4, 3, meta)
    assert on_meta is not a
    assert on_meta.causal_mask.device == meta and on_meta.lookahead.table_index.device == meta
    assert a.causal_mask.device == cpu and a.lookahead.table_index.device == cpu
    assert step_tables(4, 4, 3, meta).lookahead.future_blocked.device == meta
    assert step_tables(12, 4, 0, cpu).lookahead is None and step_tables(0, 4, 3, cpu).lookahead is None


@pytest.mark.parametrize("variant", [0, 3, 33])
def test_results_do_not_depend_on_which_shapes_ran_before(variant):
    """Cached tables are shared, never modified: a step gives the same result whether its shape is new to
    the cache or follows steps of other (M, N)."""
    model = make_model(variant)
    tokens = torch.randint(0, 37, (2, 24))
    step_tables.cache_clear()
    first = run_segments(model, tokens, 6, 12, return_logits=True)
    for seg_len, mem_len in [(4, 8), (3, 12), (8, 16)]:
        run_segments(model, tokens, seg_len, mem_len)
    again = run_segments(model, tokens, 6, 12, return_logits=True)
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a.logits, b.logits)
        assert all(torch.equal(x, y)
                   for x, y in zip(a.memory.tensors().values(), b.memory.tensors().values(), strict=True))


# ---------------------------------------------------------------------------------------------- one-pass lse
def test_softmax_with_lse_equals_softmax_and_logsumexp():
    torch.manual_seed(0)
    scores = torch.randn(3, 4, 5, 7)
    scores[..., 0, 3:] = float("-inf")                                       # masked keys
    probs, lse = softmax_with_lse(scores)
    torch.testing.assert_close(probs, torch.softmax(scores, -1), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1), rtol=1e-6, atol=1e-6)
    assert probs.dtype == torch.float32 and lse.dtype == torch.float32
    low, low_lse = softmax_with_lse(scores.bfloat16())
    assert low.dtype == torch.bfloat16 and low_lse.dtype == torch.float32      # Z stays float32 under bf16
    torch.testing.assert_close(low_lse, torch.logsumexp(scores.bfloat16().float(), -1), rtol=1e-6, atol=1e-6)


def test_softmax_with_lse_gradient():
    """Gradients through either output or both (float64 finite differences)."""
    torch.manual_seed(1)
    scores = torch.randn(2, 3, 6, dtype=torch.float64)
    scores[0, 0, 4:] = float("-inf")
    weights = torch.randn(2, 3, 6, dtype=torch.float64)
    lse_weights = torch.randn(2, 3, dtype=torch.float64)
    x = scores.clone().requires_grad_(True)
    fns = [lambda s: (softmax_with_lse(s)[0] * weights).sum(),
           lambda s: (softmax_with_lse(s)[1] * lse_weights).sum(),
           lambda s: (softmax_with_lse(s)[0] * weights).sum() + (softmax_with_lse(s)[1] * lse_weights).sum()]
    refs = [lambda s: (torch.softmax(s, -1) * weights).sum(),
            lambda s: (torch.logsumexp(s, -1) * lse_weights).sum(),
            lambda s: (torch.softmax(s, -1) * weights).sum() + (torch.logsumexp(s, -1) * lse_weights).sum()]
    for fn, ref in zip(fns, refs, strict=True):
        grad, = torch.autograd.grad(fn(x), x)
        expected, = torch.autograd.grad(ref(x), x)
        torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)
    finite = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s: softmax_with_lse(s), (finite,))



def test_softmax_with_lse_gradient_in_place_is_the_same_gradient():
    """``grad_in_place`` (the attention's backward peak, issue 26): the scores' gradient is written into the
    probabilities' incoming gradient (it shares its storage) and equals the allocating backward bit for bit."""
    torch.manual_seed(2)
    scores = torch.randn(2, 3, 5, 9)
    scores[..., 0, 4:] = float("-inf")
    values, lse_weights = torch.randn(2, 3, 9, 4), torch.randn(2, 3, 5)
    seen = {}

    def keep(grad):                    # the probabilities' incoming gradient, before the softmax backward
        seen["ptr"] = grad.data_ptr()

    grads = []
    for in_place in (False, True):
        x = scores.clone().requires_grad_(True)
        probs, lse = softmax_with_lse(x, grad_in_place=in_place)
        probs.register_hook(keep)
        grad, = torch.autograd.grad((torch.matmul(probs, values).sum() + (lse * lse_weights).sum()), x)
        assert (grad.data_ptr() == seen["ptr"]) == in_place
        grads.append(grad)
    assert torch.equal(grads[0], grads[1])

# ---------------------------------------------------------------------------------------------- memory storage
@pytest.mark.parametrize("variant", [0, 3])
@pytest.mark.parametrize("seg_len,mem_len", [(6, 3), (6, 6), (4, 10)])
def test_memory_keeps_only_its_own_rows(variant, seg_len, mem_len):
    """Every cached tensor owns storage of exactly its own size: M rows, not the M + N rows of the step."""
    model = make_model(variant)
    tokens = torch.randint(0, 37, (3, 4 * seg_len))
    for out in run_segments(model, tokens, seg_len, mem_len):
        for name, t in out.memory.tensors().items():
            assert t.untyped_storage().nbytes() == t.numel() * t.element_size(), name
            assert t.is_contiguous() and t.shape[:2] == (3, out.memory.length)


# ---------------------------------------------------------------------------------------------- long memories
@pytest.mark.parametrize("variant", [3, 33, 0])
def test_memory_of_sixteen_segments_matches_spec(variant):
    """M = 16 N (evaluation with a long memory) against the loop-per-position spec, once the memory is full."""
    seg_len, mem_len = 2, 32
    model = make_model(variant)
    ref = SpecModel(model)
    tokens = torch.randint(0, 37, (1, 18 * seg_len + 1))
    memory, ref_memory = None, None
    for s in range(18):
        x = tokens[:, s * seg_len:(s + 1) * seg_len]
        out = model(x, memory=memory, mem_len=mem_len, return_logits=True)
        ref_logits, ref_memory = ref.run_segment(x, ref_memory, mem_len)
        torch.testing.assert_close(out.logits.double(), ref_logits, rtol=1e-5, atol=1e-5)
        memory = out.memory
    assert memory.length == mem_len == 16 * seg_len


# ---------------------------------------------------------------------------------------------- generation
@pytest.mark.parametrize("variant", [3, 0])
def test_generation_computes_only_the_sampled_logits(variant):
    model = make_model(variant)
    tokens = torch.randint(0, 37, (2, 9))
    full = model(tokens, mem_len=6, return_logits=True)
    last = model(tokens, mem_len=6, last_logits_only=True)
    assert last.logits.shape == (2, 1, 37)
    torch.testing.assert_close(last.logits, full.logits[:, -1:], rtol=0, atol=0)
    # Greedy generation equals a loop that computes every position's logits and takes the last.
    produced = generate(model, tokens, max_new_tokens=5, segment_len=4, mem_len=6, temperature=0)
    memory, expected = None, []
    for start in range(0, 9, 4):
        out = model(tokens[:, start:start + 4], memory=memory, mem_len=6, return_logits=True)
        memory, logits = out.memory, out.logits[:, -1]
    for _ in range(5):
        token = logits.argmax(-1, keepdim=True)
        expected.append(token)
        out = model(token, memory=memory, mem_len=6, return_logits=True)
        memory, logits = out.memory, out.logits[:, -1]
    assert torch.equal(produced, torch.cat(expected, 1))
