"""Per-row memory validity (``LaMemoMemory.valid``) on a real resume: 4 streams -> 8 streams where the rows per
micro-batch grow 4 -> 8, so one micro-batch mixes the 4 continuing streams (their saved memory) with 4 added
streams (no memory: valid length 0, masked row by row). Plus the model-level properties it rests on."""
from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from lamemo_parallel import LaMemoConfig, LaMemoModel
from lamemo_parallel.config import BASELINE_VARIANT, DEFAULT_VARIANT, SUPPORTED_VARIANTS, variant_traits
from lamemo_parallel.memory import VALID, LaMemoMemory
from lamemo_parallel.pipeline_runtime import StageMemory
from pretrain.checkpoint.export import export_checkpoint
from pretrain.checkpoint.format import CHECKPOINTS, rank_state_path, shard_index_path, step_tag
from pretrain.checkpoint.reshard_memory import memory_index, reshard_memory
from pretrain.config import load_config
from pretrain.data.mixture import build_streams
from pretrain.engines.plain import PlainEngine
from pretrain.layout import split_layers
from pretrain.preflight import check_data

from helpers import ROOT, TINY_CONFIG, base_overrides, launch, losses, subprocess_env, tiny_config


# ---------------------------------------------------------------------------------------------- the model
def _run(model, tokens, N, memory, steps, first=0):
    """``steps`` segments of ``tokens`` from segment ``first``: per-segment nll and the last memory."""
    nll = []
    for s in range(first, first + steps):
        out = model(tokens[:, s * N:(s + 1) * N], targets=tokens[:, s * N + 1:(s + 1) * N + 1], memory=memory)
        nll.append(out.nll)
        memory = out.memory
    return nll, memory


FULL_LOOK_AHEAD = next(v for v in SUPPORTED_VARIANTS if variant_traits(v).full_look_ahead)


@pytest.mark.parametrize("variant", [DEFAULT_VARIANT, BASELINE_VARIANT, FULL_LOOK_AHEAD])   # 33: no future mask
def test_a_row_without_memory_runs_as_alone_and_the_others_bitwise(variant, mem_len=12, N=4):
    """Rows 2-3 of a batch whose rows 0-1 hold a full memory are marked empty (valid 0): rows 0-1 are bitwise
    what they are without the mark, rows 2-3 equal running them alone from an empty memory (to fp32 rounding),
    step after step until their memory is full; gradients stay finite."""
    torch.manual_seed(0)
    model = LaMemoModel(tiny_config(50, tgt_len=N, mem_len=mem_len, variant=variant, dropout=0.0))
    tokens = torch.randint(0, 50, (4, 8 * N + 1))
    _, full = _run(model, tokens, N, None, 3)
    assert full.valid is None
    mixed = full.with_valid(torch.tensor([mem_len, mem_len, 0, 0]))
    assert mixed.valid.tolist() == [mem_len, mem_len, 0, 0]
    assert all(float(t[2:].abs().max()) == 0 for t in mixed.tensors().values() if t.dim() > 1)
    steps = mem_len // N + 1
    got, memory = _run(model, tokens, N, mixed, steps, first=3)
    same, _ = _run(model, tokens, N, full, steps, first=3)
    alone, _ = _run(model, tokens[2:], N, None, steps, first=3)
    for g, s, a in zip(got, same, alone):
        assert torch.equal(g[:2], s[:2])
        torch.testing.assert_close(g[2:], a, rtol=1e-5, atol=1e-5)
    assert memory.valid is None                      # full again: back to the unmasked path
    out = model(tokens[:, 3 * N:4 * N], targets=tokens[:, 3 * N + 1:4 * N + 1], memory=mixed)
    out.nll.mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_flex_backend_masks_the_rows_a_batch_row_lacks():
    """FlexAttention (forward, CPU reference implementation) with per-row valid lengths equals eager."""
    torch.manual_seed(1)
    model = LaMemoModel(tiny_config(50, tgt_len=4, mem_len=12, dropout=0.0)).eval()
    tokens = torch.randint(0, 50, (3, 17))
    with torch.no_grad():
        _, memory = _run(model, tokens, 4, None, 3)
        memory = memory.with_valid(torch.tensor([12, 4, 0]))
        eager = model(tokens[:, 12:16], targets=tokens[:, 13:17], memory=memory)
        model.attention_backend = "flex"
        flex = model(tokens[:, 12:16], targets=tokens[:, 13:17], memory=memory)
    torch.testing.assert_close(flex.nll, eager.nll, rtol=1e-5, atol=1e-5)
    for name, t in eager.memory.tensors().items():
        torch.testing.assert_close(flex.memory.tensors()[name], t, rtol=1e-5, atol=1e-5)


def test_memory_rows_lengths_and_stage_store():
    """valid is kept by select_rows / last / concat_rows / save-load; a pipeline stage's store advances it like
    the model, zeroes the rows that are not real, saves it, and fills a slot without memory with M empty rows;
    both engines forget single rows (data.span_memory=reset) or all of them."""
    config = tiny_config(50, tgt_len=2, mem_len=4)
    memory = LaMemoMemory.empty(batch_size=3, n_layer=2, d_model=16, n_head=2, d_head=8, lookahead=True)
    memory = LaMemoMemory.from_tensors({n: torch.ones(3, 4, *t.shape[2:], dtype=t.dtype)
                                        for n, t in memory.tensors().items()}).with_valid(torch.tensor([4, 1, 0]))
    assert memory.select_rows([0]).valid is None and memory[1:].valid.tolist() == [1, 0]
    assert memory.last(1).valid.tolist() == [1, 1, 0]
    assert LaMemoMemory.concat_rows([memory[:1], memory[1:]]).valid.tolist() == [4, 1, 0]
    assert LaMemoMemory.from_state_dict(memory.state_dict()).valid.tolist() == [4, 1, 0]
    assert float(memory.embeddings[1, :3].abs().sum()) == 0 and float(memory.embeddings[1, 3:].sum()) > 0
    store = StageMemory(2, ["embeddings"], mem_len=config.mem_len)
    store.load_state([{"embeddings": memory.embeddings, VALID: memory.valid}, None])
    assert store.length() == 4 and store.valid[1].tolist() == [0, 0, 0]
    store.commit(0, {"embeddings": torch.ones(3, 6, 16)}, store.valid[0], added=2)
    assert store.valid[0].tolist() == [4, 3, 2] and float(store.slots[0]["embeddings"][2, :2].abs().sum()) == 0
    store.commit(0, {"embeddings": torch.ones(3, 6, 16)}, store.valid[0], added=2)
    assert store.valid[0] is None and VALID not in store.state()[0] and VALID in store.state()[1]
    store.forget([[False, True, False], [False, False, False]])        # data.span_memory=reset, row by row
    assert store.valid[0].tolist() == [4, 0, 4] and float(store.slots[0]["embeddings"][1].abs().sum()) == 0
    store.forget([[True] * 3, [True] * 3])
    assert store.slots == [None, None] and store.length() == 0
    plain = SimpleNamespace(memories=[memory, None])                   # the plain engine's slots
    PlainEngine.reset_memory(plain, [[False, False, True], [True, True, True]])
    assert plain.memories[0].valid.tolist() == [4, 1, 0] and plain.memories[1] is None
    PlainEngine.reset_memory(plain, [[True, False, False], [False] * 3])
    assert plain.memories[0].valid.tolist() == [0, 1, 0]
    PlainEngine.reset_memory(plain)
    assert plain.memories == [None, None]


def test_reshard_gives_added_streams_an_empty_memory_and_keeps_saved_valid_lengths(tmp_path):
    """Saved: 4 streams, one (stream 3) with 2 of its 5 rows real; resharded for 8 streams in 2 slots of 4 on
    (TP 2, PP 2): rows of streams 0-3 bitwise, stream 3 keeps valid 2, streams 4-7 (added) valid 0 and zero rows,
    a slot of added streams only is None; an old checkpoint without valid lengths loads all-valid."""
    config = LaMemoConfig(vocab_size=50, n_layer=2, d_model=8, n_head=4, d_inner=16)
    empty = LaMemoMemory.empty(batch_size=4, n_layer=2, d_model=8, n_head=4, d_head=2, lookahead=True)
    g = torch.Generator().manual_seed(0)
    full = LaMemoMemory.from_tensors({n: torch.randn(4, 5, *t.shape[2:], generator=g).to(t.dtype)
                                      for n, t in empty.tensors().items()})
    for valid, expect in ((torch.tensor([5, 5, 5, 2]), [5, 5, 5, 2]), (None, None)):
        saved = full.with_valid(valid)
        ckpt = tmp_path / f"ckpt{valid is None}"
        ckpt.mkdir()
        state = [saved.state_dict()]
        torch.save({"memory": state}, rank_state_path(ckpt, 0))
        shard_index_path(ckpt, 0).write_text(json.dumps({"rank": 0, "tp_rank": 0, "stage": 0, "dp_rank": 0,
                                                         "memory": memory_index(state, [[0, 1, 2, 3]])}))
        marker = {"layout": {"tensor": 1, "pipeline_partition": [2]}}
        for tp_rank, stage in ((0, 0), (1, 1)):
            got = reshard_memory(ckpt, marker, model_config=config, tp_rank=tp_rank, tp_size=2, stage=stage,
                                 parts=split_layers(2, 2), slot_streams=[[0, 1, 4, 5], [6, 7, 2, 3]], added_from=4)
            heads = slice(2 * tp_rank, 2 * tp_rank + 2)
            for name, t in got[0].items():
                if name == VALID:
                    continue
                want = saved.tensors()[name][[0, 1]]
                want = want[:, :, heads] if name.startswith(("vectors", "log_norm")) else want
                assert torch.equal(t[:2], want) and float(t[2:].abs().sum()) == 0
                want = saved.tensors()[name][[2, 3]]
                want = want[:, :, heads] if name.startswith(("vectors", "log_norm")) else want
                assert torch.equal(got[1][name][2:], want) and float(got[1][name][:2].abs().sum()) == 0
            assert got[0][VALID].tolist() == [5, 5, 0, 0]
            assert got[1][VALID].tolist() == [0, 0, 5, 2 if expect else 5]
            solo = reshard_memory(ckpt, marker, model_config=config, tp_rank=tp_rank, tp_size=2, stage=stage,
                                  parts=split_layers(2, 2), slot_streams=[[0, 1, 2, 3], [4, 5, 6, 7]], added_from=4)
            assert solo[1] is None and (VALID in solo[0]) == (expect is not None)


# ---------------------------------------------------------------------------------------------- a real resume
# One saved run serves both resumes: 4 streams (one micro-batch of 4), 2 pipeline stages, memory of 16 = 2 segments.
def _overrides(corpus, run_dir, rows: int, *extra: str) -> list[str]:
    return [*base_overrides(corpus, run_dir), "data.micro_batches=1", f"data.micro_batch_size={rows}",
            "data.mem_len=16", "run.steps=4", "run.save_interval=3", *extra]


@pytest.fixture(scope="module")
def four_streams(corpus, tmp_path_factory):
    """The 4-stream run: its step-3 checkpoint and its memory after step 4 (LAMEMO_DUMP_MEMORY)."""
    run_dir = tmp_path_factory.mktemp("four-streams") / "run"
    result = launch(2, _overrides(corpus, run_dir, 4, "parallel.pipeline=2"),
                    env_extra={"LAMEMO_DUMP_MEMORY": str(run_dir / "memory")})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return SimpleNamespace(ckpt=run_dir / CHECKPOINTS / step_tag(3), losses=losses(run_dir),
                           memory=LaMemoMemory.load(run_dir / "memory" / "memory-dp0.safetensors"))


CHECK = r"""
import json, sys, torch
from pathlib import Path
from lamemo_parallel.memory import LaMemoMemory
from pretrain.checkpoint.format import rank_state_path
from pretrain.config import load_config
from pretrain.data.streams import SegmentStreams
from pretrain.library_imports import import_deepspeed
from pretrain.distributed import init_distributed, launch_world_size
from pretrain.layout import resolve_layout
from pretrain.startup import resolve_device, set_cpu_threads
from pretrain.trainer import Trainer
config = load_config(sys.argv[1], json.loads(sys.argv[2]))
ckpt = Path(sys.argv[3])
import_deepspeed(tracking=False)
device = resolve_device(config)
layout = resolve_layout(config, launch_world_size(), cuda=False)
set_cpu_threads(device)
rank, world = init_distributed(device)
Path(config.run.dir).mkdir(parents=True)  # what pretrain.trainer.run's claim of the run directory does
trainer = Trainer(config, device, rank, world, layout, Path(config.run.dir))
trainer.set_up()                     # the real start-up: build the engine, reshard the 2-stage 4-stream checkpoint
saved = [torch.load(rank_state_path(ckpt, r), weights_only=True) for r in range(2)]     # the two stages' files
first = LaMemoMemory.from_tensors({**saved[0]["memory"][0], **saved[1]["memory"][0]})
loaded = trainer.engine.memories[0]
four = SegmentStreams(trainer.streams.tokens, tgt_len=config.data.tgt_len, dp_size=1, dp_rank=0, micro_batches=1,
                      micro_batch_size=4)
four.load_state_dict(saved[0]["streams"])
state = trainer.streams.state_dict()
batches8, batches4 = [trainer.streams.next_step()[0] for _ in range(3)], [four.next_step()[0] for _ in range(3)]
trainer.streams.load_state_dict(state)
report = {"valid": loaded.valid.tolist(), "start": trainer.start_step,
          "memory_bitwise": all(torch.equal(t[:4], first.tensors()[n]) for n, t in loaded.tensors().items()
                                if n != "valid"),
          "added_zero": all(float(t[4:].abs().sum()) == 0 for n, t in loaded.tensors().items() if n != "valid"),
          "inputs_bitwise": all(torch.equal(a[0][:4], b[0]) and torch.equal(a[1][:4], b[1])
                                for a, b in zip(batches8, batches4))}
model = trainer.engine.module
model.eval()
with torch.no_grad():                # the same weights: 8-row forward vs the 4 rows, and the added rows alone
    m8, m4, m_alone, worst_cont, worst_added = loaded, first, None, 0.0, 0.0
    for b8, b4 in zip(batches8, batches4):
        o8 = model(b8[0], targets=b8[1], memory=m8)
        o4 = model(b4[0], targets=b4[1], memory=m4)
        oa = model(b8[0][4:], targets=b8[1][4:], memory=m_alone)
        worst_cont = max(worst_cont, float(((o8.nll[:4] - o4.nll).abs() / o4.nll.abs()).max()))
        worst_added = max(worst_added, float(((o8.nll[4:] - oa.nll).abs() / oa.nll.abs()).max()))
        m8, m4, m_alone = o8.memory, o4.memory, oa.memory
report.update(continuing_rel=worst_cont, added_rel=worst_added,
              valid_after=None if m8.valid is None else m8.valid.tolist())
model.train()
report["losses"] = [trainer.engine.train_step(trainer.streams.next_step()).loss for _ in range(2)]
print("REPORT " + json.dumps(report))
"""


@pytest.mark.slow
@pytest.mark.distributed
def test_four_to_eight_streams_in_one_micro_batch_keep_the_first_four(corpus, tmp_path, four_streams):
    """The 4-stream checkpoint (2 stages) resumed on one process with 8 streams (one micro-batch of 8 rows; the
    weights and memory resharded): rows 0-3 get the saved memory bitwise, rows 4-7 valid length 0 and zero rows;
    the loader gives rows 0-3 bitwise the next inputs of a 4-stream run for 3 steps; with the loaded weights, rows
    0-3's per-step losses equal the 4-stream run's and rows 4-7's equal running those streams alone from an empty
    memory (1e-5 relative), the added rows fill up (valid None after 2 segments); training goes on."""
    overrides = _overrides(corpus, tmp_path / "run", 8, f"run.resume={four_streams.ckpt}", "run.steps=6")
    check = subprocess.run([sys.executable, "-c", CHECK, str(TINY_CONFIG), json.dumps(overrides),
                            str(four_streams.ckpt)],
                           capture_output=True, text=True, env=subprocess_env(), cwd=ROOT, timeout=600)
    assert check.returncode == 0, check.stderr[-3000:]
    report = json.loads(next(line for line in check.stdout.splitlines() if line.startswith("REPORT "))[7:])
    assert "data: streams 4 -> 8" in check.stdout + check.stderr
    assert "added streams start with an empty memory" in check.stdout + check.stderr
    assert report["start"] == 3 and report["valid"] == [16] * 4 + [0] * 4
    assert report["memory_bitwise"] and report["added_zero"] and report["inputs_bitwise"]
    assert report["continuing_rel"] <= 1e-5 and report["added_rel"] <= 1e-5, report
    assert report["valid_after"] is None                      # 3 segments of 8 fill the added rows' 16
    assert all(0 < loss < 10 for loss in report["losses"]), report


@pytest.mark.slow
@pytest.mark.distributed
def test_pipelined_four_to_eight_streams_mix_in_every_stage(corpus, tmp_path, four_streams):
    """The same checkpoint resumed on the same 2 stages with 8 streams (one micro-batch of 8): every stage loads
    its layers' memory for rows 0-3 and 16 empty rows (valid 0) for rows 4-7. After step 4 the memory of rows 0-3
    (gathered over the stages) equals the 4-stream run's after its step 4; rows 4-7 hold 8 real rows (valid 8 of
    16) equal to those streams run alone from an empty memory on the single-device model with the step-3 weights;
    step 4's loss is the mean of the two runs' (1e-5 relative)."""
    run_dir = tmp_path / "eight"
    overrides = _overrides(corpus, run_dir, 8, "parallel.pipeline=2", f"run.resume={four_streams.ckpt}")
    result = launch(2, overrides, env_extra={"LAMEMO_DUMP_MEMORY": str(run_dir / "memory")})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    log = result.stdout + result.stderr
    assert "data: streams 4 -> 8" in log and "added streams start with an empty memory" in log
    eight, four = LaMemoMemory.load(run_dir / "memory" / "memory-dp0.safetensors"), four_streams.memory
    assert eight.valid.tolist() == [16] * 4 + [8] * 4 and eight.length == four.length == 16
    for name, t in four.tensors().items():
        torch.testing.assert_close(eight.tensors()[name][:4], t, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")

    export_checkpoint(four_streams.ckpt, tmp_path / "step3")
    model = LaMemoModel.from_pretrained(tmp_path / "step3").eval()
    config = load_config(TINY_CONFIG, overrides)
    streams = build_streams(check_data(config, verify_checksums=False, log=lambda _: None).train, config.data,
                            dp_size=1, dp_rank=0)
    streams.load_state_dict(torch.load(rank_state_path(four_streams.ckpt, 0), weights_only=True)["streams"],
                            strict=False)
    [(inputs, targets)] = streams.next_step()
    with torch.no_grad():
        alone = model(inputs[4:], targets=targets[4:], memory=None)
    for name, t in alone.memory.tensors().items():
        got = eight.tensors()[name][4:]
        assert float(got[:, :8].abs().sum()) == 0                       # the 8 rows they do not have: zeros
        torch.testing.assert_close(got[:, 8:], t, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
    expected = (four_streams.losses[4] + alone.nll.float().mean().item()) / 2
    assert losses(run_dir)[4] == pytest.approx(expected, rel=1e-5)
