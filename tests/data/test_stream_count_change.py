"""A changed global stream count (docs/checkpoints.md): continuing streams keep their position, added streams
start on unread data, retired streams' unread data is read by the others, and every pair of the epoch is read
once (bar the stated remainder of less than one step); the next epoch is the new count's regular cut."""
from __future__ import annotations

import numpy as np
import pytest

from pretrain.data.streams import SegmentStreams

N = 20_011


def loader(streams: int, rows: int = 2, roll_seed=None) -> list[SegmentStreams]:
    """Every data-parallel rank's loader for ``streams`` streams of ``rows`` rows per micro-batch."""
    tokens = np.arange(N, dtype=np.int64)          # a token's value is its position: pair i is (i, i + 1)
    return [SegmentStreams(tokens, tgt_len=5, dp_size=streams // rows, dp_rank=r, micro_batches=1,
                           micro_batch_size=rows, roll_seed=roll_seed) for r in range(streams // rows)]


def step(ranks: list[SegmentStreams]) -> dict[int, list[int]]:
    """{stream id: the input positions it reads this step} over all ranks; targets are the next tokens."""
    out = {}
    for r in ranks:
        for m, (inputs, targets) in enumerate(r.next_step()):
            assert np.array_equal(targets.numpy(), inputs.numpy() + 1)
            for row, ids in enumerate(r.slot_streams()[m]):
                out[ids] = inputs[row].tolist()
    return out


@pytest.mark.parametrize("before,after,roll", [(4, 8, None), (8, 4, None), (4, 6, 3), (6, 4, 3)])
def test_stream_count_change_keeps_continuing_streams_and_reads_the_epoch_once(before, after, roll):
    old = loader(before, roll_seed=roll)
    done = 7
    read = [p for _ in range(done) for ids in step(old).values() for p in ids]
    state = old[0].state_dict()
    upcoming = step(_resumed(before, state, roll))                      # the old count's next step
    new = loader(after, roll_seed=roll)
    for r in new:
        r.load_state_dict(state, strict=False)
    assert new[0].change_note.startswith(f"data: streams {before} -> {after} at pair {done * 5} of epoch 0: "
                                         f"{min(before, after)} continue")
    first = step(new)
    for s in range(min(before, after)):
        assert first[s] == upcoming[s]                                   # same next inputs: same memory
    read += [p for ids in first.values() for p in ids]
    while new[0].epoch == 0:
        read += [p for ids in step(new).values() for p in ids]
    assert len(read) == len(set(read))                                   # no pair twice in the epoch
    old_len = old[0].stream_len
    left = int(new[0].change_note.split("; ")[-1].split()[0])
    assert len(read) == before * old_len - left and left < after * 5    # all but less than one step's pairs
    # the next epoch is the regular cut of `after` streams, from its first pair
    epoch_one = step(new)
    assert new[0].epoch == 1
    if roll is None:
        assert epoch_one == step(loader(after))
    # a save and load inside the changed epoch resumes it exactly
    again = loader(after, roll_seed=roll)
    for r, n in zip(again, new):
        r.load_state_dict(n.state_dict())
    assert step(again) == step(new)


def _resumed(streams, state, roll):
    ranks = loader(streams, roll_seed=roll)
    for r in ranks:
        r.load_state_dict(state)
    return ranks
