"""FLOP accounting (docs/method.md §6) against a hand count, the figures quoted there and torch's FLOP counter;
the throughput meter (tokens/s, TFLOP/s, MFU, HFU, warm-up) and the console line."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from lamemo_parallel import LaMemoConfig, LaMemoModel
from lamemo_parallel.attention import use_selective_recompute
from lamemo_parallel.flops import (
    StepShape,
    forward_macs,
    lookahead_extra_macs,
    recomputed_core_macs,
    top_cache_only_macs,
    top_memory_rows_macs,
    training_flops,
    xl_layer_macs,
)
from pretrain.throughput import (
    ThroughputMeter,
    dense_peak_tflops,
    format_console_line,
    format_duration,
    resolve_peak_tflops,
)


def hand_count(*, N, M, d, d_ff, V, L, H, lookahead, B=1, cache_only=False):
    """Multiply-adds of one forward call on B sequences, matmul by matmul, head by head (docs/method.md §4 / §5).

    Shapes follow the algorithm: K/V on all M+N rows; queries, W_o and the FFN on current rows (XL) or on
    all rows (LaMemo; the top layer's W_o and FFN on its current rows only, as its memory rows are discarded);
    per head, logits and the weighted sum against the keys; the positional projection W_R on the distance
    table once per call (every row of the batch shares it); the tied output layer.
    ``cache_only``: count only the matmuls of LaMemo's top layer that feed nothing but its detached cache (Q on
    the memory rows, the look-ahead, W_R on the future distances): training runs them forward only.
    """
    macs = 0
    top = L - 1

    def matmul(rows, inner, cols, *, layer=None, cache=False):
        nonlocal macs
        if not cache_only or (cache and layer == top):
            macs += rows * inner * cols

    T = M + N
    dh = d // H
    if lookahead and M > 0:
        start, end = max(1, M - N + 1), M + 1        # the look-ahead window (docs/method.md §4 step 3)
        W = end - start
    for layer in range(L):
        matmul(T, d, d)                              # W_R on causal distances T-1..0
        if lookahead and M > 0:
            matmul(M, d, d, layer=layer, cache=True)   # W_R on future distances 1..M
        for _row in range(B):
            matmul(N, d, d)                          # W_q, current rows
            if lookahead:
                matmul(M, d, d, layer=layer, cache=True)   # W_q, memory rows
            matmul(T, d, d)                          # W_k
            matmul(T, d, d)                          # W_v
            for _head in range(H):
                matmul(N, dh, T)                     # content logits (q + u) k
                matmul(N, dh, T)                     # position logits (q + v) r
                matmul(N, T, dh)                     # attention weights x values
                if lookahead and M > 0:
                    matmul(M, dh, W, layer=layer, cache=True)   # look-ahead content logits
                    matmul(M, dh, W, layer=layer, cache=True)   # look-ahead position logits (v+)
                    matmul(M, W, dh, layer=layer, cache=True)   # look-ahead weights x values
            out_rows = T if lookahead and layer != top else N
            matmul(out_rows, d, d)                   # W_o
            matmul(out_rows, d, d_ff)                # FFN in
            matmul(out_rows, d_ff, d)                # FFN out
    for _row in range(B):
        matmul(N, d, V)                              # output layer
    return macs


def hand_training_macs(**shape):
    """Forward + backward (x3), less the backward of the top layer's cache-only look-ahead (x2 of it)."""
    cache = hand_count(**shape, cache_only=True) if shape["lookahead"] else 0
    return 3 * hand_count(**shape) - 2 * cache


TINY = dict(d=4, d_ff=8, V=5, H=2)


@pytest.mark.parametrize("L", [1, 2])
@pytest.mark.parametrize("N,M", [(3, 2), (3, 3), (3, 0), (2, 3), (3, 5)])
@pytest.mark.parametrize("lookahead", [False, True])
@pytest.mark.parametrize("B", [1, 3])
def test_forward_macs_matches_hand_count(L, N, M, lookahead, B):
    shape = StepShape(n_layer=L, d_model=TINY["d"], d_inner=TINY["d_ff"], vocab_size=TINY["V"], seg_len=N,
                      mem_len=M, lookahead=lookahead)
    expected = hand_count(N=N, M=M, L=L, lookahead=lookahead, B=B, **TINY)
    layers = hand_count(N=N, M=M, L=L, lookahead=lookahead, B=B, **{**TINY, "V": 0})
    assert forward_macs(shape, batch_size=B) == expected
    assert forward_macs(shape, include_output=False, batch_size=B) == layers
    trained = hand_training_macs(N=N, M=M, L=L, lookahead=lookahead, B=B, **TINY)
    assert training_flops(shape, batch_size=B) == 2 * trained
    if lookahead and M > 0:
        assert trained < 3 * expected
    # Recompute (HFU): the layer stack runs forward once more; the output layer is not checkpointed.
    assert training_flops(shape, recompute="full", batch_size=B) == 2 * (trained + layers)


def test_hand_count_by_hand():
    """One case written out in full: N=3, M=2, d=4, d_ff=8, V=5, one sequence.
    XL: W_R 5*16 + q 3*16 + k 5*16 + v 5*16 + logits/sum 3*(3*5*4) + o 3*16 + FFN 2*3*4*8 = 708; output 60.
    LaMemo adds per layer: W_R future 2*16, q and o on 2 memory rows 2*2*16, FFN 2*2*4*8, look-ahead 3*(2*2*4)
    = 272; in the top layer without o and FFN on the memory rows (2*16 + 2*2*4*8 = 160): 112, all of it
    cache-only (forward only in training)."""
    xl = StepShape(1, 4, 8, 5, 3, 2, lookahead=False)
    la = StepShape(1, 4, 8, 5, 3, 2, lookahead=True)
    la2 = StepShape(2, 4, 8, 5, 3, 2, lookahead=True)
    assert xl_layer_macs(3, 2, 4, 8) == 80 + 48 + 80 + 80 + 180 + 48 + 192 == 708
    assert lookahead_extra_macs(3, 2, 4, 8) == 32 + 64 + 128 + 48 == 272
    assert top_memory_rows_macs(3, 2, 4, 8) == 32 + 128 == 160
    assert top_cache_only_macs(3, 2, 4, 8) == 32 + 32 + 48 == 112
    assert forward_macs(xl) == 708 + 60
    assert forward_macs(la) == 708 + 112 + 60
    assert forward_macs(la, include_output=False) == 820
    assert forward_macs(la2) == 2 * 708 + 272 + 112 + 60
    assert training_flops(la) == 2 * (3 * 880 - 2 * 112)
    assert training_flops(xl) == 2 * 3 * 768


@pytest.mark.parametrize("variant", [0, 3])
@pytest.mark.parametrize("N,M", [(3, 2), (3, 3), (4, 1)])
def test_formula_matches_torch_flop_counter_on_the_model(variant, N, M):
    """The real model's matmuls, counted by torch, equal the formula (M <= N: the model scores the look-ahead
    positions against all M distances before gathering the window, which only differs when M > N)."""
    torch.manual_seed(0)
    B, L = 2, 2
    # its own size: the counted FLOPs are checked against StepShape's formula for exactly these dimensions
    config = LaMemoConfig(vocab_size=5, n_layer=L, d_model=4, n_head=2, d_inner=8, variant=variant, tgt_len=N,
                          mem_len=M)
    model = LaMemoModel(config).eval()
    tokens = torch.randint(0, 5, (B, 4 * N + 1))
    memory, pos = None, 0
    with torch.no_grad():
        while memory is None or memory.length < M:
            memory = model(tokens[:, pos:pos + N], mem_len=M, memory=memory).memory
            pos += N
        assert memory.length == M
        with FlopCounterMode(display=False) as counter:
            model(tokens[:, :N], targets=tokens[:, 1:N + 1], memory=memory, mem_len=M)
    shape = StepShape(L, 4, 8, 5, N, M, lookahead=variant != 0)
    assert counter.get_total_flops() == 2 * forward_macs(shape, batch_size=B)



class MatmulFlops(TorchDispatchMode):
    """torch's FLOP formulas for every matmul-like op that runs, forward, backward and recompute alike (the
    FlopCounterMode's module tracker does not follow the top layer's no-grad cache-only look-ahead in training)."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func._overloadpacket in flop_registry:
            self.total += flop_registry[func._overloadpacket](*args, **kwargs, out_val=out)
        return out


@pytest.mark.parametrize("variant,N,M", [(0, 3, 2), (3, 3, 2), (3, 4, 1), (3, 3, 0)])
def test_selective_recompute_flops_match_torch_count_of_a_training_step(variant, N, M):
    """What ``parallel.recompute=attention`` adds to a training step's matmuls, counted by torch on the real
    model (forward + backward, recompute included), equals ``recomputed_core_macs``: the HFU term."""
    B, L = 2, 3
    totals = {}
    for mode in ("none", "attention"):
        torch.manual_seed(0)
        config = LaMemoConfig(vocab_size=5, n_layer=L, d_model=4, n_head=2, d_inner=8, variant=variant,
                              tgt_len=N, mem_len=M)
        model = LaMemoModel(config).train()
        use_selective_recompute(model, mode)
        tokens = torch.randint(0, 5, (B, 4 * N + 1))
        memory, pos = None, 0
        with torch.no_grad():
            while M and (memory is None or memory.length < M):
                memory = model(tokens[:, pos:pos + N], mem_len=M, memory=memory).memory
                pos += N
        with MatmulFlops() as counter:
            model(tokens[:, :N], targets=tokens[:, 1:N + 1], memory=memory, mem_len=M).nll.sum().backward()
        totals[mode] = counter.total
    shape = StepShape(L, 4, 8, 5, N, M, lookahead=variant != 0)
    extra = 2 * recomputed_core_macs(shape, batch_size=B)
    assert extra > 0
    assert totals["attention"] - totals["none"] == extra
    assert (training_flops(shape, recompute="attention", batch_size=B)
            - training_flops(shape, batch_size=B)) == extra
    with pytest.raises(ValueError, match="recompute must be one of"):
        training_flops(shape, recompute=True)

def _ratios(N, M, d, d_ff, L, V, *, with_position_projection: bool):
    wr_xl = 0 if with_position_projection else (M + N) * d * d
    wr_la = 0 if with_position_projection else M * d * d
    xl_layer = xl_layer_macs(N, M, d, d_ff) - wr_xl
    extra = lookahead_extra_macs(N, M, d, d_ff) - wr_la
    stack = extra / xl_layer
    with_softmax = L * extra / (L * xl_layer + N * d * V)
    return stack, with_softmax


def test_spec_quoted_cost_examples():
    """docs/method.md §6: WikiText-103 base +72 % on the layer stack, about +22 % with the 267,735-word softmax;
    enwik8 base +65 %. Those figures come from its approximate extra cost L*M*(2d^2 + 2d*d_ff + 3N*d)
    against XL without the W_R terms; the full count (W_R included) stays within 2.5 points of them."""
    wt103 = dict(N=150, M=150, d=410, d_ff=2100, L=16, V=267_735)
    enwik8 = dict(N=512, M=512, d=512, d_ff=2048, L=12, V=204)
    stack, with_softmax = _ratios(**wt103, with_position_projection=False)
    assert round(100 * stack) == 72
    assert abs(100 * with_softmax - 22) < 1.0
    assert round(100 * _ratios(**enwik8, with_position_projection=False)[0]) == 65
    # The full count, per sequence, through forward_macs.
    for cfg, quoted_stack, quoted_softmax in ((wt103, 72, 22), (enwik8, 65, None)):
        xl = StepShape(cfg["L"], cfg["d"], cfg["d_ff"], cfg["V"], cfg["N"], cfg["M"], lookahead=False)
        la = StepShape(cfg["L"], cfg["d"], cfg["d_ff"], cfg["V"], cfg["N"], cfg["M"], lookahead=True)
        # The quoted figures are the method's (memory rows through every layer); the model skips the top
        # layer's memory rows (top_memory_rows_macs), which nothing reads.
        skipped = top_memory_rows_macs(cfg["N"], cfg["M"], cfg["d"], cfg["d_ff"])
        stack = (forward_macs(la, include_output=False) + skipped) / forward_macs(xl, include_output=False) - 1
        assert abs(100 * stack - quoted_stack) < 2.5
        if quoted_softmax is not None:
            assert abs(100 * ((forward_macs(la) + skipped) / forward_macs(xl) - 1) - quoted_softmax) < 2.5
        assert forward_macs(la, include_output=False) < forward_macs(la, include_output=False) + skipped
    # The look-ahead extra is linear in M once the window is full (M >= N: min(M, N) = N).
    assert lookahead_extra_macs(150, 600, 410, 2100) == 2 * lookahead_extra_macs(150, 300, 410, 2100)


# ---------------------------------------------------------------------------------------------- meter
class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_throughput_meter_figures_and_warmup():
    shape = StepShape(n_layer=2, d_model=64, d_inner=256, vocab_size=100, seg_len=16, mem_len=16, lookahead=True)
    clock = FakeClock()
    meter = ThroughputMeter(shape, micro_batch_size=4, forward_calls_per_step=3, n_devices=2, peak_tflops=1e-3,
                            recompute="full", warmup_steps=2, clock=clock)
    assert meter.tokens_per_step == 3 * 4 * 16
    durations = [5.0, 3.0, 0.5, 0.25, 0.25]            # the two slow warm-up steps must not count
    for seconds in durations:
        meter.begin()
        clock.now += seconds
        assert meter.end() == seconds
    assert not meter.in_warmup
    figures = meter.interval_metrics()
    model_flops = 3 * training_flops(shape, batch_size=4)
    hardware_flops = 3 * training_flops(shape, recompute="full", batch_size=4)
    assert hardware_flops == model_flops + 3 * 2 * forward_macs(shape, include_output=False, batch_size=4)
    assert figures["step_time_s"] == pytest.approx(1.0 / 3)
    assert figures["tokens_per_s"] == pytest.approx(3 * meter.tokens_per_step / 1.0)
    assert figures["tflops"] == pytest.approx(3 * model_flops / 1.0 / 2 / 1e12)
    assert figures["mfu"] == pytest.approx(figures["tflops"] / 1e-3)
    assert figures["hfu"] == pytest.approx(figures["mfu"] * hardware_flops / model_flops)
    assert 1 < figures["hfu"] / figures["mfu"] < 4 / 3
    assert figures["peak_mem_gib"] > 0
    # A new interval; the summary covers every non-warm-up step.
    meter.record(1.0, mem_len=0)
    second = meter.interval_metrics()
    empty_memory = dataclasses.replace(shape, mem_len=0)
    assert second["tflops"] == pytest.approx(3 * training_flops(empty_memory, batch_size=4) / 2 / 1e12)
    assert meter.summary()["step_time_s"] == pytest.approx(2.0 / 4)
    assert set(meter.interval_metrics()) == {"peak_mem_gib"}       # nothing timed since


def test_throughput_meter_without_peak_and_in_warmup():
    shape = StepShape(1, 8, 16, 10, 4, 4, lookahead=False)
    meter = ThroughputMeter(shape, micro_batch_size=1, warmup_steps=3)
    with meter.measure():
        pass
    assert meter.in_warmup
    assert set(meter.interval_metrics()) == {"peak_mem_gib"}      # warm-up only: no averages
    for _ in range(3):
        meter.record(0.1)
    figures = meter.interval_metrics()
    assert "tokens_per_s" in figures and "mfu" not in figures and "hfu" not in figures
    with pytest.raises(RuntimeError):
        meter.end()
    with pytest.raises(ValueError):
        ThroughputMeter(shape, micro_batch_size=0)


def test_peak_tflops_table_and_override():
    assert dense_peak_tflops("NVIDIA H100 80GB HBM3") == pytest.approx(989.4)
    assert dense_peak_tflops("NVIDIA H100 PCIe") == pytest.approx(756.5)
    assert dense_peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert dense_peak_tflops("NVIDIA A100-SXM4-80GB", "fp32") == 19.5
    assert dense_peak_tflops("NVIDIA A10") == 125.0
    assert dense_peak_tflops("NVIDIA L4") == 121.0
    assert dense_peak_tflops("Some CPU") is None
    assert resolve_peak_tflops(123.0, "cpu") == 123.0
    assert resolve_peak_tflops(0.0, "cpu") is None
    with pytest.raises(ValueError):
        resolve_peak_tflops(-1.0)


def test_console_line():
    metrics = {"loss": 3.21, "ppl": 24.78, "lr": 2.5e-4, "grad_norm": 0.53, "tokens_per_s": 12_345.0,
               "tflops": 1.234, "mfu": 0.412, "hfu": 0.549, "peak_mem_gib": 1.2, "step_time_s": 0.5,
               "eval_ppl": 22.1, "note": "text is skipped"}
    line = format_console_line(120, metrics, total_steps=1000)
    assert line.startswith("step  120/1000 | loss 3.2100 | ppl 24.78 | lr 2.500e-04 | grad 0.530 | 12.3k tok/s")
    for part in ("1.23 TFLOP/s", "MFU 41.2%", "HFU 54.9%", "mem 1.20 GiB", "0.500 s/step", "eval_ppl 22.1",
                 "ETA 0:07:20"):
        assert part in line
    assert "text is skipped" not in line
    assert format_console_line(7, {"train/loss": 1.5, "tflops": 0.004}) == "step 7 | loss 1.5000 | 4.00 GFLOP/s"
    assert format_duration(2 * 86400 + 3 * 3600 + 4 * 60 + 5) == "2d 3:04:05"
