"""Resharding the recurrent memory offline (no process group): every rank of a new layout gets exactly the rows,
heads and layers of the single-device memory that it now keeps, read from the per-rank files a saved layout
wrote; a rank reads its own share, not the memory of all streams."""
from __future__ import annotations

import json
import subprocess
import sys
from itertools import product

import pytest
import torch

from lamemo_parallel import LaMemoConfig, LaMemoMemory
from lamemo_parallel.config import SUPPORTED_VARIANTS, variant_traits
from lamemo_parallel.memory_sharding import memory_table, stage_memory_names
from pretrain.checkpoint.format import rank_state_path, shard_index_path
from pretrain.checkpoint.reshard_memory import MemoryReshardError, memory_index, reshard_memory
from pretrain.data.streams import stream_id
from pretrain.layout import split_layers

from helpers import ROOT, subprocess_env

LAMEMO = next(v for v in SUPPORTED_VARIANTS if variant_traits(v).looks_ahead)
XL = next(v for v in SUPPORTED_VARIANTS if not variant_traits(v).looks_ahead)


def model(variant, n_layer=3, **extra):
    # its own size: 4 heads (split over TP 2), 3 layers (uneven stages), small rows to compare bitwise
    return LaMemoConfig(vocab_size=50, n_layer=n_layer, d_model=8, n_head=4, d_inner=16, variant=variant, **extra)


def single_device_memory(config, streams, length, seed=0):
    """Name -> [streams, M, ...]: every row a different number, so a misplaced row or head shows."""
    g = torch.Generator().manual_seed(seed)
    empty = LaMemoMemory.empty(batch_size=streams, n_layer=config.n_layer, d_model=config.d_model,
                               n_head=config.n_head, d_head=config.d_head, lookahead=config.traits.looks_ahead)
    return {name: torch.randn(streams, length, *t.shape[2:], generator=g).to(t.dtype)
            for name, t in empty.tensors().items()}


def ranks(layout):
    """(rank, tp_rank, stage, dp_rank) of every rank, DeepSpeed's / megatron's order (tensor fastest)."""
    tp, pp, dp = layout["tp"], layout["pp"], layout["dp"]
    return [(s * dp * tp + d * tp + t, t, s, d) for s, d, t in product(range(pp), range(dp), range(tp))]


def local_memory(config, full, layout, tp_rank, stage, dp_rank):
    """What rank (tp_rank, stage, dp_rank) of ``layout`` keeps, cut directly from the single-device memory."""
    parts = split_layers(config.n_layer, layout["pp"])
    table = memory_table(config, layout["tp"], parts)
    slots = [[stream_id(dp_rank, m, r, micro_batches=layout["mb"], micro_batch_size=layout["mbs"])
              for r in range(layout["mbs"])] for m in range(layout["mb"])]
    out = []
    for ids in slots:
        slot = {}
        for name in stage_memory_names(table, stage):
            t = full[name][ids]
            if table[name].head_split:
                heads = table[name].heads(tp_rank)
                t = t[:, :, heads.start:heads.stop]
            slot[name] = t.clone()
        out.append(slot)
    return slots, out


def save_layout(tmp_path, config, full, layout):
    """The files a save under ``layout`` writes that resharding reads: per-rank memory slots and shard indexes."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for rank, tp_rank, stage, dp_rank in ranks(layout):
        slots, memory = local_memory(config, full, layout, tp_rank, stage, dp_rank)
        torch.save({"memory": memory}, rank_state_path(ckpt, rank))
        shard_index_path(ckpt, rank).write_text(json.dumps({"rank": rank, "tp_rank": tp_rank, "stage": stage,
                                                            "dp_rank": dp_rank, "memory": memory_index(memory, slots)}))
    sizes = [len(r) for r in split_layers(config.n_layer, layout["pp"])]
    return ckpt, {"layout": {"tensor": layout["tp"], "pipeline_partition": sizes}}


LAYOUTS = {  # 8 streams each: (tensor, pipeline, data) x micro-batches x rows per micro-batch
    "1x1x1 mb2 rows4": dict(tp=1, pp=1, dp=1, mb=2, mbs=4),
    "2x1x2 mb2 rows2": dict(tp=2, pp=1, dp=2, mb=2, mbs=2),
    "1x2x2 mb2 rows2": dict(tp=1, pp=2, dp=2, mb=2, mbs=2),
    "2x3x1 mb4 rows2": dict(tp=2, pp=3, dp=1, mb=4, mbs=2),
    "4x1x2 mb1 rows4": dict(tp=4, pp=1, dp=2, mb=1, mbs=4),
    "1x1x4 mb1 rows2": dict(tp=1, pp=1, dp=4, mb=1, mbs=2),
}
PAIRS = [("2x1x2 mb2 rows2", "1x2x2 mb2 rows2"), ("2x3x1 mb4 rows2", "1x1x4 mb1 rows2"),
         ("1x1x4 mb1 rows2", "4x1x2 mb1 rows4"), ("1x2x2 mb2 rows2", "2x3x1 mb4 rows2"),
         ("4x1x2 mb1 rows4", "1x1x1 mb2 rows4")]


@pytest.mark.parametrize("variant", [LAMEMO, XL])
@pytest.mark.parametrize("source,target", PAIRS)
def test_every_rank_gets_its_streams_heads_and_layers(tmp_path, variant, source, target):
    config = model(variant)
    full = single_device_memory(config, 8, length=5)
    ckpt, marker = save_layout(tmp_path, config, full, LAYOUTS[source])
    layout = LAYOUTS[target]
    for _, tp_rank, stage, dp_rank in ranks(layout):
        slots, expected = local_memory(config, full, layout, tp_rank, stage, dp_rank)
        got = reshard_memory(ckpt, marker, model_config=config, tp_rank=tp_rank, tp_size=layout["tp"], stage=stage,
                             parts=split_layers(config.n_layer, layout["pp"]), slot_streams=slots)
        assert [sorted(s) for s in got] == [sorted(s) for s in expected]
        for g, e in zip(got, expected, strict=True):
            assert all(torch.equal(g[name], e[name]) for name in e)        # bitwise


def test_precision_change_keeps_z_bar_in_float32(tmp_path):
    config = model(LAMEMO)
    full = single_device_memory(config, 8, length=3)
    ckpt, marker = save_layout(tmp_path, config, full, LAYOUTS["2x1x2 mb2 rows2"])
    layout = LAYOUTS["1x1x1 mb2 rows4"]
    slots, _ = local_memory(config, full, layout, 0, 0, 0)
    got = reshard_memory(ckpt, marker, model_config=config, tp_rank=0, tp_size=1, stage=0,
                         parts=split_layers(config.n_layer, 1), slot_streams=slots, dtype=torch.bfloat16)
    assert got[0]["vectors.0"].dtype == torch.bfloat16 and got[0]["embeddings"].dtype == torch.bfloat16
    assert got[0]["log_normalizers.0"].dtype == torch.float32


def test_missing_streams_and_unsaved_memory(tmp_path):
    """Streams the checkpoint never held are refused by id; a checkpoint saved before the first step (no
    memory in any slot) gives None (start empty)."""
    config = model(LAMEMO)
    full = single_device_memory(config, 8, length=3)
    ckpt, marker = save_layout(tmp_path, config, full, LAYOUTS["1x1x4 mb1 rows2"])
    with pytest.raises(MemoryReshardError, match="stream 9"):
        reshard_memory(ckpt, marker, model_config=config, tp_rank=0, tp_size=1, stage=0,
                       parts=split_layers(config.n_layer, 1), slot_streams=[[0, 9]])
    empty = tmp_path / "b"
    empty.mkdir()
    torch.save({"memory": [None]}, rank_state_path(empty, 0))
    shard_index_path(empty, 0).write_text(json.dumps({"rank": 0, "tp_rank": 0, "stage": 0, "dp_rank": 0,
                                                      "memory": memory_index([None], [[0, 1]])}))
    assert reshard_memory(empty, marker, model_config=config, tp_rank=0, tp_size=1, stage=0,
                          parts=split_layers(config.n_layer, 1), slot_streams=[[0, 1]]) is None


PEAK_PROBE = """
import json, resource, sys, torch
from pathlib import Path
from lamemo_parallel import LaMemoConfig
from pretrain.checkpoint.reshard_memory import reshard_memory
from pretrain.layout import split_layers
config = LaMemoConfig(**json.loads(sys.argv[2]))
ckpt = Path(sys.argv[1])
marker = json.loads((ckpt / "marker.json").read_text())
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
got = reshard_memory(ckpt, marker, model_config=config, tp_rank=1, tp_size=2, stage=1,
                     parts=split_layers(config.n_layer, 2), slot_streams=[[6, 7]])
held = sum(t.numel() * t.element_size() for s in got for t in s.values())
print(json.dumps({"grown": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024, "held": held}))
"""


def test_a_rank_reads_its_share_not_the_whole_memory(tmp_path):
    """Saved on 4 data-parallel ranks (8 streams, 2 per rank, about 96 MB of memory in all); a rank of
    (tensor 2, pipeline 2, data 4) keeps 1 of 4 ranks' streams, half the heads and half the layers: its peak
    resident memory grows by about its own share (1/16 of the whole, 6 MB), far below the whole memory."""
    config = model(LAMEMO, n_layer=4, d_head=256)
    full = single_device_memory(config, 8, length=512)
    total = sum(t.numel() * t.element_size() for t in full.values())
    ckpt, marker = save_layout(tmp_path, config, full, dict(tp=1, pp=1, dp=4, mb=1, mbs=2))
    del full
    (ckpt / "marker.json").write_text(json.dumps(marker))
    probe = subprocess.run([sys.executable, "-c", PEAK_PROBE, str(ckpt), json.dumps(config.to_dict())],
                           capture_output=True, text=True, env=subprocess_env(), cwd=ROOT, timeout=120)
    assert probe.returncode == 0, probe.stderr[-3000:]
    result = json.loads(probe.stdout.strip().splitlines()[-1])
    assert result["held"] * 14 < total < result["held"] * 18
    assert result["grown"] < total / 4, (result, total)


def test_data_streams_keeps_the_global_stream_count_on_any_world_size():
    """``data.streams``: the micro-batches per rank follow the data-parallel size, the stream count stays; a
    count the layout cannot split is refused with one line."""
    from pretrain.config import TrainConfigError, load_config
    from pretrain.layout import resolve_layout
    from helpers import TINY_CONFIG
    for world, micro_batches in ((4, 1), (2, 2), (1, 4)):
        config = load_config(TINY_CONFIG, ["data.streams=8", "data.micro_batch_size=2"])
        layout = resolve_layout(config, world, cuda=False)
        assert config.data.micro_batches == micro_batches
        assert layout.data * config.data.micro_batches * config.data.micro_batch_size == 8
    with pytest.raises(TrainConfigError, match="data.streams=6 is not a multiple of data-parallel size 4"):
        resolve_layout(load_config(TINY_CONFIG, ["data.streams=6", "data.micro_batch_size=1"]), 4, cuda=False)


def test_four_to_eight_streams_keeps_the_first_four_bit_identical(tmp_path):
    """4 streams (1 rank, 2 micro-batches of 2) saved after 7 steps, resumed with 8 (4 micro-batches of 2): the
    loader gives streams 0-3 the inputs the 4-stream run would have read next, and the micro-batches holding
    them get their saved memory bitwise (what ``load._continue_streams`` reshards for them); streams 4-7 start
    on unread data in micro-batches of their own, with an empty memory."""
    import numpy as np
    from pretrain.data.streams import SegmentStreams
    config = model(LAMEMO)
    tokens = np.arange(5003, dtype=np.int64)
    make = lambda mb: SegmentStreams(tokens, tgt_len=5, dp_size=1, dp_rank=0, micro_batches=mb,  # noqa: E731
                                     micro_batch_size=2)
    four = make(2)
    for _ in range(7):
        four.next_step()
    state = four.state_dict()
    full = single_device_memory(config, 4, length=5)
    ckpt, marker = save_layout(tmp_path, config, full, dict(tp=1, pp=1, dp=1, mb=2, mbs=2))
    eight = make(4)
    eight.load_state_dict(state, strict=False)
    assert eight.change_note.startswith("data: streams 4 -> 8 at pair 35 of epoch 0: 4 continue")
    expected, got = four.next_step(), eight.next_step()
    assert all(torch.equal(a, b) and torch.equal(x, y) for (a, x), (b, y) in zip(expected, got[:2]))
    seen = {int(t) for slot in expected for t in slot[0].flatten()}
    assert not seen & {int(t) for slot in got[2:] for t in slot[0].flatten()}      # added streams: unread data
    slots = eight.slot_streams()
    assert slots == [[0, 1], [2, 3], [4, 5], [6, 7]]
    memory = reshard_memory(ckpt, marker, model_config=config, tp_rank=0, tp_size=1, stage=0,
                            parts=split_layers(config.n_layer, 1), slot_streams=slots[:2])
    for slot, ids in zip(memory, slots[:2]):
        assert all(torch.equal(slot[name], full[name][ids]) for name in full)
