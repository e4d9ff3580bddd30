"""The segment-recurrent loader: coverage, order, DP disjointness, exact resume, roll; evaluation segments."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pretrain.data.errors import DataError
from pretrain.data.streams import SegmentStreams, stream_id

# Tokens 0..N-1: every value names its own position, so a delivered token says exactly where it came from.
N = 10_007
LAYOUT = dict(tgt_len=7, dp_size=3, micro_batches=2, micro_batch_size=4)


def loaders(n: int = N, roll_seed: int | None = None, **layout: int) -> list[SegmentStreams]:
    layout = {**LAYOUT, **layout}
    tokens = np.arange(n, dtype=np.int64)
    return [SegmentStreams(tokens, dp_rank=r, roll_seed=roll_seed, **layout) for r in range(layout["dp_size"])]


def run(loader: SegmentStreams, steps: int) -> dict[int, tuple[list[int], list[int]]]:
    """{stream id: (inputs, targets)} of this rank over ``steps`` steps, each stream's tokens in order."""
    out: dict[int, tuple[list[int], list[int]]] = {}
    for _ in range(steps):
        for m, (inputs, targets) in enumerate(loader.next_step()):
            assert inputs.dtype == targets.dtype == torch.long
            assert inputs.shape == targets.shape == (loader.micro_batch_size, loader.tgt_len)
            for row in range(loader.micro_batch_size):
                ins, tgs = out.setdefault(loader.stream_id(loader.dp_rank, m, row), ([], []))
                ins.extend(inputs[row].tolist())
                tgs.extend(targets[row].tolist())
    return out


def test_every_token_of_a_stream_once_in_order_per_epoch() -> None:
    for loader in loaders():
        L, epoch_steps = loader.stream_len, loader.steps_per_epoch
        assert L % loader.tgt_len == 0 and epoch_steps * loader.tgt_len == L
        first, second = run(loader, epoch_steps), run(loader, epoch_steps)
        assert len(first) == loader.micro_batches * loader.micro_batch_size
        for s, (inputs, targets) in first.items():
            assert inputs == list(range(s * L, (s + 1) * L))  # contiguous, in order, each once
            assert targets == [i + 1 for i in inputs]  # the next token
            assert second[s] == (inputs, targets)  # the next epoch starts over
        assert loader.state_dict()["epoch"] == 2


def test_dp_ranks_are_disjoint_and_together_cover_the_data() -> None:
    ranks = loaders()
    seen = np.zeros(N, dtype=np.int64)
    for loader in ranks:
        for inputs, _ in run(loader, loader.steps_per_epoch).values():
            seen[inputs] += 1
    S, L, T = ranks[0].num_streams, ranks[0].stream_len, ranks[0].tgt_len
    assert S == 3 * 2 * 4
    assert (seen[: S * L] == 1).all()  # disjoint and complete ...
    assert (seen[S * L :] == 0).all() and N - S * L <= S * T + S  # ... up to a tail shorter than one step


def test_stream_id_is_a_pure_rank_major_function() -> None:
    loader = loaders()[0]
    ids = [stream_id(r, m, b, micro_batches=2, micro_batch_size=4)
           for r in range(3) for m in range(2) for b in range(4)]
    assert ids == list(range(24))
    assert loader.stream_id(2, 1, 3) == 23
    other = loaders()[2]
    (first_inputs, _), _ = other.next_step()
    assert first_inputs[:, 0].tolist() == [other.stream_id(2, 0, b) * other.stream_len for b in range(4)]


@pytest.mark.parametrize("roll_seed", [None, 1234])
def test_resume_at_any_step_gives_the_identical_sequence(roll_seed: int | None) -> None:
    rank = 1
    reference = loaders(roll_seed=roll_seed)[rank]
    total = 2 * reference.steps_per_epoch + 5  # across two epoch boundaries (and two rolls)
    states, steps = [], []
    for _ in range(total):
        states.append(json.loads(json.dumps(reference.state_dict())))  # plain data, as in a checkpoint
        steps.append(reference.next_step())
    for k in range(total):  # every step, the epoch boundaries included
        resumed = loaders(roll_seed=roll_seed)[rank]
        resumed.load_state_dict(states[k])
        assert resumed.state_dict() == states[k]
        for expected in steps[k:]:
            for (a, b), (c, d) in zip(resumed.next_step(), expected, strict=True):
                assert torch.equal(a, c) and torch.equal(b, d)


def test_roll_rotates_each_stream_per_epoch_deterministically() -> None:
    plain, rolled = loaders()[0], loaders(roll_seed=5)[0]
    again, other = loaders(roll_seed=5)[0], loaders(roll_seed=6)[0]
    steps = plain.steps_per_epoch
    base = run(plain, steps)
    epochs = [run(rolled, steps), run(rolled, steps)]
    assert epochs[0] == run(again, steps)  # deterministic from (seed, epoch)
    assert epochs[0] != run(other, steps)
    L = plain.stream_len
    for s, (inputs, _) in base.items():
        shifts = []
        for epoch in epochs:
            r_in, r_tg = epoch[s]
            assert r_tg == [i + 1 for i in r_in]  # every target is still the true next token
            shift = r_in[0] - s * L
            assert r_in == inputs[shift:] + inputs[:shift]  # a rotation: each pair once per epoch
            shifts.append(shift)
        assert shifts == [int(rolled.roll_shifts(e)[s]) for e in range(2)]
    assert any(a != b for a, b in zip(epochs[0].values(), epochs[1].values(), strict=True))  # a new roll each epoch


def test_changed_layout_is_refused_or_mapped_with_a_warning() -> None:
    old = loaders()[0]
    for _ in range(old.steps_per_epoch + old.steps_per_epoch // 2):
        old.next_step()
    state = old.state_dict()
    new = loaders(dp_size=2, tgt_len=5)[0]        # (a change of the stream count alone: test_stream_count_change.py)
    with pytest.raises(DataError, match="layout changed.*num_streams 24 -> 16"):
        new.load_state_dict(state)
    with pytest.warns(UserWarning, match="resuming at epoch 1"):
        new.load_state_dict(state, strict=False)
    assert new.epoch == 1 and new.offset % new.tgt_len == 0
    assert abs((new.offset - new.stream_len) / new.stream_len - 0.5) < 2 / new.steps_per_epoch
    with pytest.raises(DataError, match="invalid loader state"):
        new.load_state_dict({"offset": -7})


def test_memmap_and_tensor_inputs_work_like_arrays(tmp_path) -> None:
    tokens = np.arange(1000, dtype=np.uint16)
    path = tmp_path / "t.bin"
    tokens.tofile(path)
    mm = np.memmap(path, dtype=np.uint16, mode="r")
    a = SegmentStreams(mm, tgt_len=5, dp_size=1, dp_rank=0, micro_batches=1, micro_batch_size=3).next_step()
    b = SegmentStreams(torch.arange(1000), tgt_len=5, dp_size=1, dp_rank=0, micro_batches=1,
                       micro_batch_size=3).next_step()
    assert torch.equal(a[0][0], b[0][0]) and a[0][0].dtype == torch.long
