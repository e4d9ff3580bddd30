"""The mixture loader (pretrain/data/mixture.py) and its sources (pretrain/data/sources.py): shares follow the
weights, no pair twice within a source's epoch, ranks agree, exact resume, the span sequence is a pure function,
refusals; the config forms of data.train / data.valid."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch

from helpers import ROOT
from pretrain.config import TrainConfigError, load_config
from pretrain.data.errors import DataError
from pretrain.data.mixture import MixtureStreams, SpanSchedule, data_metrics
from pretrain.data.sources import Source, TokenConcat, parse_sources
from pretrain.data.streams import SegmentStreams

BASE = 1_000_000     # token value = source * BASE + position: a delivered token says where it came from


def sources(sizes=(40_000, 90_000), weights=(1, 3)) -> list[Source]:
    return [Source(f"s{i}", float(w), np.arange(n, dtype=np.int64) + i * BASE)
            for i, (n, w) in enumerate(zip(sizes, weights))]


def loaders(srcs, *, dp_size=2, micro_batches=1, micro_batch_size=4, tgt_len=32, **kw) -> list[MixtureStreams]:
    return [MixtureStreams(srcs, tgt_len=tgt_len, dp_size=dp_size, dp_rank=r, micro_batches=micro_batches,
                           micro_batch_size=micro_batch_size, **kw) for r in range(dp_size)]


def share(loader: MixtureStreams, index: int) -> float:
    return loader.read[index] / sum(loader.read)


@pytest.mark.parametrize("dp_size,micro_batch_size", [(2, 4), (2, 1), (1, 2)])
def test_shares_follow_the_weights_within_400_steps(dp_size: int, micro_batch_size: int) -> None:
    """Weights 1:3, 400 steps of 32 tokens, 8 or 2 streams: the second source's share is 0.75 +- 0.03, and it
    stays near the weights over every window of 100 steps after the first span."""
    ranks = loaders(sources(), dp_size=dp_size, micro_batch_size=micro_batch_size)
    history = []
    for _ in range(400):
        for loader in ranks:
            loader.next_step()
        history.append(list(ranks[0].read))
    assert all(loader.read == ranks[0].read for loader in ranks)          # every rank counts all streams
    assert abs(share(ranks[0], 1) - 0.75) <= 0.03
    assert sum(ranks[0].read) == 400 * 32 * ranks[0].num_streams
    for start in range(50, 300, 50):
        window = np.array(history[start + 100]) - np.array(history[start])
        assert abs(window[1] / window.sum() - 0.75) <= 0.1


def test_fewer_streams_than_sources_still_follow_the_weights() -> None:
    srcs = sources(sizes=(30_000, 30_000, 60_000), weights=(0.2, 0.3, 0.5))
    (loader,) = loaders(srcs, dp_size=1, micro_batch_size=2)
    for _ in range(400):
        loader.next_step()
    for i, want in enumerate((0.2, 0.3, 0.5)):
        assert abs(share(loader, i) - want) <= 0.03


def test_no_pair_read_twice_within_a_source_epoch_and_every_pair_is_true() -> None:
    """All ranks, several epochs of the small source (with a roll): within each (source, epoch) every (input,
    target) pair is distinct, each span reads contiguous text, and the targets are the next tokens."""
    srcs = sources(sizes=(6_000, 20_000), weights=(1, 1))
    ranks = loaders(srcs, dp_size=2, micro_batch_size=2, tgt_len=16, span_len=100, roll_seed=7)
    epoch_of_span = {}
    schedule = ranks[0].schedule

    def record():                           # which (source, epoch) each global span belongs to
        taken = list(schedule.taken)
        g, source, start = SpanSchedule.next(schedule)
        epoch_of_span[g] = (source, (taken[source]) // schedule.spans_per_epoch[source])
        return g, source, start
    schedule.next = record
    pairs = collections.defaultdict(list)
    for _ in range(600):
        for loader in ranks:
            batches = loader.next_step()
            spans = loader.stream_span
            for m, (inputs, targets) in enumerate(batches):
                assert (targets == inputs + 1).all()
                for row in range(loader.micro_batch_size):
                    sid = loader._local[m * loader.micro_batch_size + row]
                    key = epoch_of_span[int(spans[sid])]
                    assert (inputs[row] // BASE == key[0]).all()
                    pairs[key].extend(inputs[row].tolist())
    assert max(e for (s, e) in pairs if s == 0) >= 2          # the small source went round several times
    for key, values in pairs.items():
        assert len(values) == len(set(values)), key


def test_resume_at_any_step_is_exact() -> None:
    srcs = sources()
    (straight,) = loaders(srcs, dp_size=1, micro_batch_size=3, roll_seed=3, span_len=64)
    ref = [straight.next_step() for _ in range(40)]
    for k in (0, 1, 5, 17, 39):
        (first,) = loaders(srcs, dp_size=1, micro_batch_size=3, roll_seed=3, span_len=64)
        for _ in range(k):
            first.next_step()
        state = first.state_dict()
        (resumed,) = loaders(srcs, dp_size=1, micro_batch_size=3, roll_seed=3, span_len=64)
        resumed.load_state_dict(state)
        for step in range(k, 40):
            for (a, b), (c, d) in zip(resumed.next_step(), ref[step], strict=True):
                assert (a == c).all() and (b == d).all()
        assert resumed.read == straight.read


def test_span_sequence_is_a_pure_function_and_layout_independent() -> None:
    """The g-th span a 2-stream run hands out is span_at(g) of an 8-stream run's schedule."""
    srcs = sources()
    (two,) = loaders(srcs, dp_size=1, micro_batch_size=2, roll_seed=5)
    eight = loaders(srcs, dp_size=2, micro_batch_size=4, roll_seed=5)[1]
    handed = []
    original = two.schedule.next
    two.schedule.next = lambda: handed.append(original()) or handed[-1]
    for _ in range(200):
        two.next_step()
    assert len(handed) > 20
    for g, source, start in handed:
        assert eight.schedule.span_at(g) == (source, start)


def test_sources_too_short_for_one_span_per_stream_are_refused() -> None:
    with pytest.raises(DataError, match="source 's0' is too short.*fewer than one per stream"):
        loaders(sources(sizes=(2_000, 90_000)), dp_size=2, micro_batch_size=4, span_len=512)


def test_a_single_source_state_and_a_mixture_state_refuse_each_other() -> None:
    """(Changed sources or weights are refused at start-up, by pretrain/data/identity.py, before the loader.)"""
    (loader,) = loaders(sources(), dp_size=1)
    loader.next_step()
    state = loader.state_dict()
    with pytest.raises(DataError, match="single-source"):
        loader.load_state_dict(SegmentStreams(np.arange(9000), tgt_len=32, dp_size=1, dp_rank=0, micro_batches=1,
                                              micro_batch_size=4).state_dict())
    single = SegmentStreams(np.arange(9000), tgt_len=32, dp_size=1, dp_rank=0, micro_batches=1, micro_batch_size=4)
    with pytest.raises(DataError, match="a mixture's but data.train is one token file.*restart_streams"):
        single.load_state_dict(state)


def _pairs(inputs: torch.Tensor) -> set[int]:
    return set(inputs.flatten().tolist())


@pytest.mark.parametrize("before,after", [(4, 8), (8, 4), (4, 6)])
def test_changed_stream_count_continues_the_streams_and_hands_out_unread_spans(before, after) -> None:
    """The loader's one rule (streams.stream_count_change) for a mixture, mid-span: refused strictly; otherwise
    streams 0 .. min - 1 read bitwise what a run that kept ``before`` streams reads next, until their spans end;
    added streams start on spans nobody read; retired streams' unread rests are read by the others (no pair is
    lost or read twice); it resumes exactly inside the change; another tgt_len still restarts every span."""
    P, T = 96, 32
    (loader,) = loaders(sources(), dp_size=1, micro_batch_size=before, span_len=P)
    read_before = set()
    for _ in range(4):                                   # 1 span + 1 segment: every stream mid-span
        read_before |= _pairs(loader.next_step()[0][0])
    state = loader.state_dict()
    (other,) = loaders(sources(), dp_size=1, micro_batch_size=after, span_len=P)
    with pytest.raises(DataError, match=f"num_streams {before} -> {after}"):
        other.load_state_dict(state)
    other.load_state_dict(state, strict=False)
    keep = min(before, after)
    assert other.change_note.startswith(f"data: streams {before} -> {after} at global span {before * 2}: {keep} "
                                        f"continue with their position and memory")
    rests = (before - keep) * (P - T)
    assert f"{rests} unread pairs of retired streams' spans" in other.change_note
    straight = [loader.next_step()[0][0] for _ in range(2)]
    changed = [other.next_step()[0][0] for _ in range(2)]
    for a, b in zip(straight, changed):
        assert torch.equal(a[:keep], b[:keep])          # continuing streams: their own spans, bitwise
    assert not _pairs(torch.stack([b[keep:] for b in changed])) & (read_before | _pairs(torch.stack(straight)[:, :keep]))
    # the retired streams' rests are read by somebody after the change, and no pair is read twice
    read_after = [other.next_step()[0][0] for _ in range(40)]
    every = torch.cat([torch.stack(changed).flatten(), torch.stack(read_after).flatten()]).tolist()
    rest_of_retired = _pairs(torch.stack(straight)[:, keep:])
    assert rest_of_retired <= set(every)
    assert len(every) == len(set(every)) and not set(every) & read_before
    resumed_state = other.state_dict()
    (again,) = loaders(sources(), dp_size=1, micro_batch_size=after, span_len=P)
    again.load_state_dict(resumed_state)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(other.next_step(), again.next_step()))
    (longer,) = loaders(sources(), dp_size=1, micro_batch_size=after, span_len=P, tgt_len=48)
    with pytest.warns(UserWarning, match="fresh span"):
        longer.load_state_dict(state, strict=False)


def test_shards_are_read_as_one_source() -> None:
    whole = np.arange(1000, dtype=np.uint16)
    concat = TokenConcat([whole[:300], whole[300:301], whole[301:]])
    index = np.array([[0, 299, 300, 301], [999, 5, 300, 700]])
    assert len(concat) == 1000 and (concat[index] == index).all()
    assert (concat[298:303] == np.arange(298, 303)).all()
    srcs = [Source("a", 1.0, concat), Source("b", 1.0, np.arange(1000))]
    (loader,) = loaders(srcs, dp_size=1, micro_batch_size=2, tgt_len=8, span_len=16)
    for _ in range(200):                       # several epochs across the shard boundaries
        for inputs, targets in loader.next_step():
            assert (targets == inputs + 1).all()


def test_single_source_metrics_use_the_prefix_stem() -> None:
    streams = SegmentStreams(np.arange(9000), tgt_len=10, dp_size=2, dp_rank=1, micro_batches=1, micro_batch_size=2)
    for _ in range(3):
        streams.next_step()
    assert data_metrics(streams, "data/wt2/train") == {"data/tokens/train": 120,
                                                       "data/epoch/train": 30 / streams.stream_len}


def test_config_takes_a_prefix_or_a_list_from_yaml_and_the_command_line(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  train:\n    - {name: web, path: d/web/train, weight: 0.7}\n"
                    "    - {path: [d/books/a, d/books/b], weight: 0.3}\n  valid: [d/web/valid]\n")
    config = load_config(path)
    assert config.data.train[0] == {"name": "web", "path": "d/web/train", "weight": 0.7}
    specs = parse_sources(config.data.train, "data.train")
    assert [(s.name, s.paths, s.weight) for s in specs] == [("web", ("d/web/train",), 0.7),
                                                           ("a", ("d/books/a", "d/books/b"), 0.3)]
    override = load_config(path, ["data.train=[{name: x, path: d/x, weight: 1}, {name: y, path: d/y, weight: 2}]",
                                  "data.valid=[d/x/valid]"])
    assert override.data.train == [{"name": "x", "path": "d/x", "weight": 1}, {"name": "y", "path": "d/y",
                                                                                 "weight": 2}]
    assert override.data.valid == ["d/x/valid"]                  # a list stays a list, not the string "[...]"
    assert load_config(path, ["data.train=d/plain/train"]).data.train == "d/plain/train"
    saved = tmp_path / "saved.yaml"
    override.save(saved)
    assert load_config(saved).data.train == override.data.train


@pytest.mark.parametrize("value,message", [
    ("[{path: a/x, weight: -1}, {path: b/y, weight: 1}]", r"data.train\[0\].weight must be >= 0"),
    ("[{path: a/x, weight: lots}, {path: b/y, weight: 1}]", r"data.train\[0\].weight must be a number"),
    ("[{path: a/x, weight: 0}, {path: b/y, weight: 0}]", "all weights are zero"),
    ("[{path: a/train, weight: 1}, {path: b/train, weight: 1}]", "two sources are named 'train'"),
    ("[{path: a/x, weigth: 1}]", "unknown field"),
    ("[{path: a/x}, {path: b/y, weight: 1}]", "has no weight"),
])
def test_bad_source_lists_are_refused_at_load(value: str, message: str) -> None:
    with pytest.raises(TrainConfigError, match=message):
        load_config(None, [f"data.train={value}"])


def test_span_memory_reset_forgets_the_rows_that_begin_a_span() -> None:
    """data.span_memory=reset: spans of P = 3 segments begin for all streams together at steps 1, 4, 7, ... (the
    whole memory); after a stream-count change mid-span only the rows that begin a span (the added streams, then
    the pieces of retired streams' spans) forget, row by row."""
    def begins(loader: MixtureStreams, steps: int) -> list:
        out = []
        for _ in range(steps):
            rows = loader.new_span_rows()
            out.append(None if rows is None else [r for row in rows for r in row])
            before = loader.stream_span.copy(), loader.stream_pos.copy()
            loader.next_step()
            began = (loader.stream_pos == 32) & ((loader.stream_span != before[0]) | (before[1] >= 32))
            assert began.tolist() == (out[-1] or [False] * loader.num_streams)
        return out

    (loader,) = loaders(sources(), dp_size=1, micro_batch_size=4, span_len=96)      # P = 96 = 3 x tgt_len 32
    every, none = [True] * 4, None
    assert begins(loader, 8) == [every, none, none, every, none, none, every, none]
    (wider,) = loaders(sources(), dp_size=1, micro_batch_size=6, span_len=96)
    wider.load_state_dict(loader.state_dict(), strict=False)     # 1 segment before the boundary; 4, 5 added
    assert begins(wider, 3) == [[False] * 4 + [True] * 2, [True] * 4 + [False] * 2, None]
    (narrower,) = loaders(sources(), dp_size=1, micro_batch_size=2, span_len=96)
    narrower.load_state_dict(wider.state_dict(), strict=False)   # streams 2, 3 retire with 1 segment left each
    assert narrower.pool == [[int(wider.stream_span[j]), int(wider.stream_source[j]),
                              int(wider.stream_start[j]) + 64, 32] for j in (2, 3)]
    assert begins(narrower, 3) == [None, [True, True], [True, True]]     # the pieces, then new spans


@pytest.mark.parametrize("overrides,message", [
    (["data.span_memory=forget"], "data.span_memory must be keep or reset, got 'forget'"),
    (["data.train=data/web/train", "data.span_memory=reset"], "data.span_memory=reset needs a mixture"),
    (["data.train=[{path: a/x, weight: 1}]", "data.span_memory=reset"], None),
    (["data.train=data/web/train"], None),                             # keep is the default
])
def test_span_memory_is_keep_or_reset_and_reset_needs_spans(overrides, message, capsys) -> None:
    """One error line, exit 2, for a bad value or reset on one token file (no spans: it would do nothing)."""
    from pretrain.train import main as train_main
    config = ROOT / "configs" / "mixture-cpu.yaml"
    if message is None:
        assert load_config(config, overrides).data.span_memory == ("reset" if "reset" in overrides[-1] else "keep")
        return
    assert train_main(["--config", str(config), "--dry-run", *overrides]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {message}"), err


def test_a_changed_span_memory_on_resume_is_named_in_the_resume_line() -> None:
    from pretrain.resume_settings import changed_settings
    config = load_config(ROOT / "configs" / "mixture-cpu.yaml", ["data.span_memory=reset"])
    assert changed_settings({"data": {"span_memory": "keep"}}, config) == {"data.span_memory": ("keep", "reset")}
    assert changed_settings({"data": {"span_memory": "reset"}}, config) == {}
