"""Streaming evaluation next to the model (lamemo_parallel/inference.py): the streams it cuts, the segments
it walks, and the loss it reports, checked against the model run by hand."""
import math

import pytest
import torch

from lamemo_parallel.inference import evaluate_tokens, segments, split_streams

from helpers import TINY_MODEL, tiny_model


def test_evaluate_tokens_equals_the_model_run_by_hand_and_calls_progress_once_per_segment():
    model = tiny_model(41, TINY_MODEL, perturb=0, variant=3, init_std=0.3)
    tokens = torch.randint(0, 41, (24,))
    streams = split_streams(tokens, 2)                 # 23 predictions // 2 streams = 11 each, + 1 target
    assert torch.equal(streams, torch.stack([tokens[0:12], tokens[11:23]]))
    assert [inputs.shape[1] for inputs, _ in segments(streams, 4)] == [4, 4, 3]      # the last one shorter

    model.eval()
    memory, nll_sum, count = None, 0.0, 0
    with torch.no_grad():
        for start in range(0, 11, 4):
            end = min(start + 4, 11)
            out = model(streams[:, start:end], targets=streams[:, start + 1:end + 1], memory=memory, mem_len=6)
            memory = out.memory
            nll_sum += out.nll.double().sum().item()
            count += out.nll.numel()

    calls, yielded = [], []

    def progress(steps, total):
        calls.append(total)
        for step in steps:
            yielded.append(step[0].shape)
            yield step

    model.train()
    result = evaluate_tokens(model, tokens, tgt_len=4, mem_len=6, batch_size=2, progress=progress)
    assert model.training                               # the caller's mode is given back
    assert calls == [3] and yielded == [torch.Size([2, 4]), torch.Size([2, 4]), torch.Size([2, 3])]
    assert result.n_tokens == count == 22
    assert result.nll_sum == pytest.approx(nll_sum, rel=1e-6)
    assert result.loss == pytest.approx(nll_sum / count, rel=1e-6)
    assert result.perplexity == pytest.approx(math.exp(nll_sum / count), rel=1e-6)
    assert result.bits_per_token == pytest.approx(nll_sum / count / math.log(2), rel=1e-6)
    assert evaluate_tokens(model, tokens, tgt_len=4, mem_len=6, batch_size=2).nll_sum == pytest.approx(nll_sum,
                                                                                                     rel=1e-6)


def test_split_streams_refuses_too_few_tokens():
    with pytest.raises(ValueError, match="at least 2 tokens"):
        split_streams(torch.tensor([3]), 1)
    with pytest.raises(ValueError, match="cannot fill 4 evaluation streams"):
        split_streams(torch.arange(4), 4)
