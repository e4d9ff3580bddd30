"""Streaming evaluation: perplexity / bits over a whole token sequence with fixed-length segments.

The sequence is cut into ``batch_size`` contiguous streams (as Transformer-XL's evaluation does); every step
feeds each stream its next ``tgt_len`` tokens with the memory of everything before. Every token is scored
exactly once. The last segment may be shorter than ``tgt_len``: that changes the look-ahead tiling of that
one step (docs/method.md §9.7) — harmless for perplexity, and the only way to score every token.

Needs only a model with the single-device interface; a progress bar is the caller's (``progress=``), so the
library stays torch-only.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

Segment = tuple[torch.Tensor, torch.Tensor]
# Wraps the segment iterator, e.g. ``functools.partial(tqdm, desc="evaluate")``: called once as
# ``progress(segments, total=number_of_segments)`` and iterated in its place.
Progress = Callable[..., Iterable[Segment]]


@dataclass
class EvalResult:
    nll_sum: float        # nats
    n_tokens: int

    @property
    def loss(self) -> float:
        return self.nll_sum / max(self.n_tokens, 1)

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 700.0))

    @property
    def bits_per_token(self) -> float:
        return self.loss / math.log(2)

    def bits_per_character(self, n_characters: int) -> float:
        return self.nll_sum / math.log(2) / n_characters


def split_streams(tokens: torch.Tensor, batch_size: int) -> torch.Tensor:
    """[L] -> [batch_size, L' + 1] contiguous streams, L' = (L - 1) // batch_size: each stream predicts L'
    tokens and holds one more (the target after its last input)."""
    tokens = torch.as_tensor(tokens).long().flatten()
    if tokens.numel() < 2:
        raise ValueError("evaluation needs at least 2 tokens")
    per_stream = (tokens.numel() - 1) // batch_size
    if per_stream < 1:
        raise ValueError(f"{tokens.numel()} tokens cannot fill {batch_size} evaluation streams")
    rows = [tokens[i * per_stream:(i + 1) * per_stream + 1] for i in range(batch_size)]
    return torch.stack(rows)


def segments(streams: torch.Tensor, tgt_len: int) -> Iterator[Segment]:
    """(inputs, targets) [B, n] of every step over ``streams`` [B, L + 1]; the last step may be shorter."""
    length = streams.shape[1] - 1
    for start in range(0, length, tgt_len):
        end = min(start + tgt_len, length)
        yield streams[:, start:end], streams[:, start + 1:end + 1]


def segment_count(streams: torch.Tensor, tgt_len: int) -> int:
    """How many steps ``segments(streams, tgt_len)`` yields."""
    return -(-(streams.shape[1] - 1) // tgt_len)


@torch.no_grad()
def evaluate_streams(model, streams: torch.Tensor, *, tgt_len: int, mem_len: int, progress: Progress | None = None
                     ) -> EvalResult:
    """Score ``streams`` [B, L + 1] (each row predicts its L tokens) with a model that has the single-device
    interface (``LaMemoModel``, ``TensorParallelLaMemoModel``, a ZeRO-wrapped module); the memory of every
    stream is carried in a local variable, so a model's training memory is left alone."""
    was_training = model.training
    model.eval()
    memory, nll_sum, count = None, 0.0, 0
    steps: Iterable[Segment] = segments(streams, tgt_len)
    if progress is not None:
        steps = progress(steps, total=segment_count(streams, tgt_len))
    for inputs, targets in steps:
        out = model(inputs, targets=targets, memory=memory, mem_len=mem_len)
        memory = out.memory
        nll_sum += out.nll.double().sum().item()
        count += out.nll.numel()
    model.train(was_training)
    return EvalResult(nll_sum=nll_sum, n_tokens=count)


def evaluate_tokens(model, tokens, *, tgt_len: int, mem_len: int, batch_size: int = 1, device=None,
                    progress: Progress | None = None) -> EvalResult:
    """Score ``tokens`` (1-D) with streaming memory on one device. The (batch_size - 1) tokens that do not fill
    the streams evenly are left out (at most batch_size - 1 of them; batch_size = 1 scores every token)."""
    device = device or next(model.parameters()).device
    return evaluate_streams(model, split_streams(tokens, batch_size).to(device), tgt_len=tgt_len,
                            mem_len=mem_len, progress=progress)
