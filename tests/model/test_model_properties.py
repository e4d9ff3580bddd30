"""Properties the method promises (docs/method.md §4, §9): interpolation = one softmax over the union of keys,
look-ahead windows tile the text, no leakage, memory shapes, gradient flow."""
import math

import pytest
import torch

from lamemo_parallel import MemoryMismatchError
from lamemo_parallel.attention import use_selective_recompute
from lamemo_parallel.config import RECOMPUTE_MODES
from lamemo_parallel.positions import lookahead_window

from helpers import TINY_MODEL, tiny_model

VARIANTS = [0, 3, 31, 32, 33]


def make_model(variant=3, n_layer=2, seed=0, **overrides):
    return tiny_model(41, TINY_MODEL, seed=seed, perturb=0, n_layer=n_layer, variant=variant, init_std=0.3,
                      **overrides)


def run_segments(model, tokens, seg_len, mem_len, **kwargs):
    memory, outs = None, []
    for s in range(tokens.shape[1] // seg_len):
        out = model(tokens[:, s * seg_len:(s + 1) * seg_len], memory=memory, mem_len=mem_len, **kwargs)
        outs.append(out)
        memory = out.memory
    return outs


# --------------------------------------------------------------------------- interpolation
@pytest.mark.parametrize("seg_len,mem_len", [(3, 9), (4, 8), (2, 7)])
def test_cached_state_equals_one_softmax_over_union_of_keys(seg_len, mem_len):
    """In layer 0 a token's keys, values and queries depend only on token embeddings, so they stay fixed
    across segments. After k look-ahead steps the cached (C-bar, Z-bar) of a memory position must equal
    one softmax over every key it has attended: its causal keys when it was current, plus all keys to its
    right up to the current segment's first token."""
    torch.set_default_dtype(torch.float64)
    try:
        model = make_model(3, n_layer=1)
        n_seg = 5
        tokens = torch.randint(0, 41, (2, n_seg * seg_len))
        outs = run_segments(model, tokens, seg_len, mem_len)
        attn = model.layers[0].attn
        H, dh = 2, 8
        x = model.embed(tokens)                                     # [B, L, d], fixed per token
        q = attn.q_proj(x).view(2, -1, H, dh)
        k = attn.k_proj(x).view(2, -1, H, dh)
        v = attn.v_proj(x).view(2, -1, H, dh)
        inv = model.inv_freq

        def r(delta):
            ang = delta * inv
            return attn.r_proj(torch.cat([ang.sin(), ang.cos()])).view(H, dh)

        total = n_seg * seg_len
        memory = outs[-1].memory
        M = memory.length
        checked = 0
        for row in range(M):
            a = total - M + row                                    # absolute position of this memory row
            seg_of_a = a // seg_len
            first_key = max(0, seg_of_a * seg_len - min(mem_len, seg_of_a * seg_len))   # causal keys when current
            causal_keys = range(first_key, a + 1)
            future_keys = range(a + 1, (n_seg - 1) * seg_len + 1)  # up to the last segment's first token
            logits = []
            for j in causal_keys:
                logits.append(((q[:, a] + model.content_bias) * k[:, j]).sum(-1)
                              + ((q[:, a] + model.position_bias) * r(a - j)).sum(-1))
            for p in future_keys:
                logits.append(((q[:, a] + model.content_bias) * k[:, p]).sum(-1)
                              + ((q[:, a] + model.future_position_bias) * r(p - a)).sum(-1))
            logits = torch.stack(logits, -1) / math.sqrt(dh)          # [B, H, keys]
            keys = list(causal_keys) + list(future_keys)
            expected_vec = torch.einsum("bhj,bjhd->bhd", torch.softmax(logits, -1), v[:, keys])
            expected_lse = torch.logsumexp(logits, -1)
            torch.testing.assert_close(memory.log_normalizers[0][:, row].double(), expected_lse, rtol=1e-6, atol=1e-6)
            # The release's 1e-6 in the interpolation's denominator (kept for exactness) shifts alpha by up to
            # 1e-6 per look-ahead step, i.e. the vector by ~1e-6 * |C-bar - a| per step: hence 1e-5.
            torch.testing.assert_close(memory.vectors[0][:, row], expected_vec, rtol=1e-5, atol=1e-5)
            checked += len(future_keys) > 0
        assert checked > 0
    finally:
        torch.set_default_dtype(torch.float32)


# --------------------------------------------------------------------------- window tiling
@pytest.mark.parametrize("variant", [3, 31, 32])
@pytest.mark.parametrize("seg_len,mem_len", [(4, 4), (4, 10), (5, 3)])
def test_lookahead_windows_tile_the_text(variant, seg_len, mem_len):
    """Inspect the attention weights: each memory position attends every token to its right, up to the
    current segment's first token, exactly once over all the steps it spends in memory."""
    model = make_model(variant)
    n_seg = 6
    tokens = torch.randint(0, 41, (1, n_seg * seg_len))
    outs = run_segments(model, tokens, seg_len, mem_len, return_attention=True)
    seen: dict[int, list[int]] = {}
    last_memory_step: dict[int, int] = {}
    M = 0
    for s, out in enumerate(outs):
        if M > 0:
            for layer_att in out.attentions:
                start, end = layer_att["lookahead_window"]
                assert (start, end) == lookahead_window(M, seg_len)
                probs = layer_att["lookahead"][0]                      # [H, M, W]
                assert probs.shape[-1] == min(M, seg_len)
                offset = s * seg_len - M                                # absolute position of memory row 0
                for i in range(M):
                    keys = [offset + start + w for w in range(end - start) if bool((probs[:, i, w] > 0).all())]
                    masked = [w for w in range(end - start) if bool((probs[:, i, w] == 0).all())]
                    assert len(keys) + len(masked) == end - start      # every head agrees on the window
                    if layer_att is out.attentions[0]:
                        seen.setdefault(offset + i, []).extend(keys)
                        last_memory_step[offset + i] = s
        M = min(mem_len, (s + 1) * seg_len)
    assert seen
    for a, keys in seen.items():
        expected = list(range(a + 1, last_memory_step[a] * seg_len + 1))
        assert keys == expected, f"memory position {a}: saw {keys}, expected {expected}"


# --------------------------------------------------------------------------- no leakage
@pytest.mark.parametrize("variant", VARIANTS)
def test_no_leakage_from_future_tokens(variant):
    seg_len, mem_len = 6, 6
    model = make_model(variant)
    tokens = torch.randint(0, 41, (2, 4 * seg_len))
    base = run_segments(model, tokens, seg_len, mem_len, return_logits=True)
    for seg in (0, 2, 3):
        for t in range(seg_len - 1):
            changed = tokens.clone()
            pos = seg * seg_len + t
            changed[:, pos + 1:] = torch.randint(0, 41, changed[:, pos + 1:].shape)
            outs = run_segments(model, changed, seg_len, mem_len, return_logits=True)
            for s in range(seg):
                torch.testing.assert_close(outs[s].logits, base[s].logits, rtol=0, atol=1e-6)
            torch.testing.assert_close(outs[seg].logits[:, :t + 1], base[seg].logits[:, :t + 1], rtol=0, atol=1e-6)
            assert not torch.allclose(outs[seg].logits[:, t + 1:], base[seg].logits[:, t + 1:])


# --------------------------------------------------------------------------- memory lengths
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("seg_len,mem_len", [(5, 0), (5, 3), (5, 5), (4, 9)])
def test_memory_lengths_and_shapes(variant, seg_len, mem_len):
    if variant == 33 and 0 < mem_len < seg_len:
        mem_len = seg_len      # 33 needs M >= N; the short-memory error is tested elsewhere
    model = make_model(variant)
    B = 3
    tokens = torch.randint(0, 41, (B, 4 * seg_len + 1))
    memory = None
    for s in range(4):
        x, y = tokens[:, s * seg_len:(s + 1) * seg_len], tokens[:, s * seg_len + 1:(s + 1) * seg_len + 1]
        out = model(x, targets=y, memory=memory, mem_len=mem_len)
        assert out.nll.shape == (B, seg_len) and torch.isfinite(out.nll).all()
        expected_M = min(mem_len, (s + 1) * seg_len)
        mem = out.memory
        assert mem.length == expected_M and mem.embeddings.shape == (B, expected_M, 16)
        if variant == 0:
            assert len(mem.hidden) == 1 and mem.hidden[0].shape == (B, expected_M, 16) and not mem.vectors
        else:
            assert [tuple(c.shape) for c in mem.vectors] == [(B, expected_M, 2, 8)] * 2
            assert [tuple(z.shape) for z in mem.log_normalizers] == [(B, expected_M, 2)] * 2
            assert all(z.dtype == torch.float32 for z in mem.log_normalizers)
        memory = mem


def test_memory_select_save_load_and_errors(tmp_path):
    model = make_model(3)
    tokens = torch.randint(0, 41, (3, 12))
    outs = run_segments(model, tokens, 6, 6)
    mem = outs[-1].memory
    mem.save(tmp_path / "mem.safetensors")
    loaded = type(mem).load(tmp_path / "mem.safetensors")
    for name, t in mem.tensors().items():
        assert torch.equal(loaded.tensors()[name], t)
    # one batch row of the memory gives the same next-segment result as the full batch's row
    nxt = torch.randint(0, 41, (3, 6))
    full = model(nxt, memory=mem, return_logits=True)
    row = model(nxt[1:2], memory=mem.select_rows(1), return_logits=True)
    torch.testing.assert_close(row.logits, full.logits[1:2], rtol=1e-6, atol=1e-6)
    with pytest.raises(MemoryMismatchError, match="batch rows"):
        model(nxt[:2], memory=mem)
    with pytest.raises(MemoryMismatchError, match="Transformer-XL"):
        make_model(0)(nxt, memory=mem)


def test_evaluation_may_use_a_longer_memory_than_training():
    """mem_len per call (docs/method.md §9.8): a memory of 24 rows behind segments of 8 holds the last 24 tokens'
    embeddings and changes the scores exactly from the first segment where it holds more than 8 rows."""
    model = make_model(3)
    torch.manual_seed(5)
    tokens = torch.randint(0, 41, (2, 41))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    short = run_segments(model, inputs, 8, 8)
    long_ = run_segments(model, inputs, 8, 24)
    assert [o.memory.length for o in short] == [8] * 5
    assert [o.memory.length for o in long_] == [8, 16, 24, 24, 24]
    # the FIFO is the embeddings of the last 24 tokens read (eval mode: no dropout; embeddings are scaled by sqrt(d))
    torch.testing.assert_close(long_[-1].memory.embeddings, model.embedding(inputs[:, 16:40]) * 4.0)

    def nll(outs):
        return [torch.nn.functional.cross_entropy(o.logits.transpose(1, 2), targets[:, i * 8:(i + 1) * 8],
                                                  reduction="none") for i, o in enumerate(outs)]

    nll_short, nll_long = nll(short), nll(long_)
    for s in (0, 1):     # memory of 0 and 8 rows in both runs: identical scores
        torch.testing.assert_close(nll_long[s], nll_short[s], rtol=1e-6, atol=1e-6)
    for s in (2, 3, 4):  # 16 / 24 memory rows against 8: every sequence's scores move
        assert (nll_long[s] - nll_short[s]).abs().amax(dim=1).min() > 1e-3, s


# --------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("variant", [3, 0])
def test_gradient_flow(variant):
    """Nothing reaches the cached state; the recomputed memory path and Z+ do receive gradient
    (checked against finite differences in float64, which a detached Z+ would fail)."""
    torch.manual_seed(0)
    model = make_model(variant).double()
    tokens = torch.randint(0, 41, (2, 13))
    first = model(tokens[:, :6], targets=tokens[:, 1:7])
    memory = first.memory
    for t in memory.tensors().values():
        assert t.grad_fn is None and not t.requires_grad
    leaves = {name: t.clone().requires_grad_(True) for name, t in memory.tensors().items()}
    mem = type(memory).from_tensors(leaves)
    out = model(tokens[:, 6:12], targets=tokens[:, 7:13], memory=mem)
    assert all(t.grad_fn is None for t in out.memory.tensors().values())
    assert out.nll.sum().requires_grad

    if variant == 3:
        # Z+ and the memory path: the future position bias enters only through look-ahead logits
        # (hence only through Z+ -> alpha and a_i); the gradient must match finite differences.
        def loss_fn(bias):
            saved = model.future_position_bias.data.clone()
            model.future_position_bias.data.copy_(bias)
            try:
                return model(tokens[:, 6:12], targets=tokens[:, 7:13], memory=memory).nll.sum()
            finally:
                model.future_position_bias.data.copy_(saved)

        model.zero_grad()
        model(tokens[:, 6:12], targets=tokens[:, 7:13], memory=memory).nll.sum().backward()
        analytic = model.future_position_bias.grad.clone()
        assert analytic.abs().max() > 0
        base = model.future_position_bias.detach().clone()
        numeric = torch.zeros_like(base)
        eps = 1e-6
        for idx in range(base.numel()):
            delta = torch.zeros_like(base).view(-1)
            delta[idx] = eps
            delta = delta.view_as(base)
            numeric.view(-1)[idx] = (loss_fn(base + delta) - loss_fn(base - delta)) / (2 * eps)
        torch.testing.assert_close(analytic, numeric, rtol=1e-5, atol=1e-7)

        # The memory rows' queries (docs/method.md §4, "Gradients"): the W_q gradient must be the true derivative
        # of the loss, which includes the memory-query path (look-ahead logits -> Z+, alpha, a_i -> memory states
        # -> the next layer's keys and values). Directional finite differences in float64 check it; the same
        # model with its memory-row queries detached (a forward hook) gives a gradient that is measurably
        # different and fails the same check, so the check sees that path.
        attn = model.layers[0].attn
        M = memory.length

        def grad_and_loss(cut_memory_queries):
            hook = None
            if cut_memory_queries:
                hook = attn.q_proj.register_forward_hook(
                    lambda module, args, out: torch.cat([out[:, :M].detach(), out[:, M:]], dim=1))
            try:
                model.zero_grad()
                loss = model(tokens[:, 6:12], targets=tokens[:, 7:13], memory=memory).nll.sum()
                loss.backward()
                return attn.q_proj.weight.grad.clone()
            finally:
                if hook is not None:
                    hook.remove()

        full, cut = grad_and_loss(False), grad_and_loss(True)
        weight = attn.q_proj.weight
        generator = torch.Generator().manual_seed(3)
        for _ in range(3):
            direction = torch.randn(weight.shape, generator=generator, dtype=weight.dtype)
            with torch.no_grad():
                saved = weight.clone()
                weight.add_(direction, alpha=eps)
                plus = model(tokens[:, 6:12], targets=tokens[:, 7:13], memory=memory).nll.sum()
                weight.copy_(saved).add_(direction, alpha=-eps)
                minus = model(tokens[:, 6:12], targets=tokens[:, 7:13], memory=memory).nll.sum()
                weight.copy_(saved)
            numeric_slope = (plus - minus) / (2 * eps)
            torch.testing.assert_close((full * direction).sum(), numeric_slope, rtol=1e-6, atol=1e-8)
            assert abs((cut * direction).sum() - numeric_slope) > 1e-3 * abs(numeric_slope)
        assert (full - cut).abs().max() > 1e-3 * full.abs().max()


@pytest.mark.parametrize("variant", [3, 0])
def test_recompute_gives_identical_losses_and_gradients(variant):
    """Dropout on: the recompute must replay the same masks and read the memory as it was at forward time.
    Selective recompute (the attention core) is bitwise equal to keeping everything, gradients included; the
    whole-layer recompute's losses are bitwise and its gradients within float32 rounding."""
    results = {}
    for mode in RECOMPUTE_MODES:
        model = make_model(variant, dropout=0.2, dropatt=0.2).train()
        model.activation_checkpointing = mode == "full"
        use_selective_recompute(model, mode)
        torch.manual_seed(11)
        tokens = torch.randint(0, 41, (2, 19))
        memory, grads, losses, kept = None, [], [], []

        def keep(tensor):   # what autograd keeps for backward outside the recomputed regions
            kept.append(tensor.numel() * tensor.element_size())
            return tensor

        for s in range(3):
            with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
                out = model(tokens[:, s * 6:(s + 1) * 6], targets=tokens[:, s * 6 + 1:(s + 1) * 6 + 1],
                            memory=memory)
            out.nll.mean().backward()
            memory = out.memory
            losses.append(out.nll.detach())
        grads = [p.grad.clone() for p in model.parameters()]
        results[mode] = (losses, grads, memory, sum(kept))
    l0, g0, m0, kept_none = results["none"]
    assert results["full"][3] < results["attention"][3] < kept_none   # each keeps less than the one before
    for mode in ("attention", "full"):
        l1, g1, m1, _ = results[mode]
        assert all(torch.equal(a, b) for a, b in zip(l0, l1, strict=True)), mode
        assert all(torch.equal(a, b) for a, b in zip(m0.tensors().values(), m1.tensors().values(), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(g0, results["attention"][1], strict=True))
    assert all(torch.allclose(a, b, rtol=1e-6, atol=1e-7) for a, b in zip(g0, results["full"][1], strict=True))


@pytest.mark.parametrize("variant,seg_len,mem_len", [
    (variant, n, m) for variant in (3, 31, 32, 33) for n, m in ((4, 4), (3, 7), (5, 2))
    if not (variant == 33 and m < n)])   # 33 (full look-ahead) refuses M < N
def test_top_layer_step_skips_only_the_discarded_memory_rows(variant, seg_len, mem_len):
    """``feeds_next_layer=False`` (the top layer): the same current rows, the same new cache (C-bar, Z-bar) and
    the same gradients as the full step whose memory-row outputs are then dropped; the memory rows' look-ahead
    is left out of the autograd graph."""
    model = make_model(variant, n_layer=1).train()          # dropout 0: both calls see the same numbers
    layer, B = model.layers[0], 2
    torch.manual_seed(3)
    hidden = torch.randn(B, mem_len + seg_len, 16)
    memory = (torch.randn(B, mem_len, 2, 8), torch.randn(B, mem_len, 2, dtype=torch.float32))
    positions = model.position_encodings(mem_len, seg_len, hidden.dtype)
    weight = torch.randn(B, seg_len, 16)
    results = []
    for feeds_next_layer in (True, False):
        model.zero_grad(set_to_none=True)
        x = hidden.clone().requires_grad_()
        step = layer.step(x, memory, positions=positions, biases=model.global_biases(),
                          feeds_next_layer=feeds_next_layer)
        current = step.hidden[:, mem_len:] if feeds_next_layer else step.hidden
        assert current.shape == (B, seg_len, 16)
        (current * weight).sum().backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        results.append((current.detach(), step.memory, x.grad.clone(), grads))
    (h_full, mem_full, gx_full, g_full), (h_top, mem_top, gx_top, g_top) = results
    # fp32: the top step runs W_q on the current rows apart from the memory rows (other matmul blocking).
    torch.testing.assert_close(h_top, h_full, rtol=1e-6, atol=1e-6)
    for a, b in zip(mem_top, mem_full, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gx_top, gx_full, rtol=1e-5, atol=1e-6)
    assert set(g_top) <= set(g_full)
    for name, grad in g_full.items():
        torch.testing.assert_close(g_top.get(name, torch.zeros_like(grad)), grad, rtol=1e-5, atol=1e-6,
                                   msg=name)
    # Nothing of the memory rows' look-ahead in the graph: the future biases get no gradient at all.
    assert not any("future" in name for name in g_top)
