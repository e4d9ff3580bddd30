"""Pipeline parallelism (DeepSpeed's pipe engine over LaMemoPipelineModule) against the single-device reference.

Each layout is one real ``torchrun`` launch of ``python -m pretrain.train`` (gloo, CPU): per-step losses, the
exported weights and the memory of every stream after the last step (gathered over stages and TP ranks by
``LAMEMO_DUMP_MEMORY``) must equal a plain-torch run over the same global batch (tests/parallel/train_reference.py) to
~1e-5 relative (with whole-layer recompute through the deprecated ``parallel.activation_checkpointing``).
Selective recompute (``parallel.recompute=attention``) and none must give bitwise identical runs, dropout on.
The small in-process tests cover the stage memory store and the position-dropout mask shared by all stages.
"""
from __future__ import annotations

import pytest
import torch

from lamemo_parallel import LaMemoConfig, LaMemoMemory, LaMemoModel
from pretrain.config import load_config
from train_reference import reference_run

from helpers import BASE_STEPS as STEPS
from helpers import ROOT, assert_eval_matches_export, base_overrides, eval_overrides, launch, read_losses

PIPELINE_LAYOUTS = {  # name: (tensor, pipeline, data, extra overrides)
    # M grows 0, 8, 16 (two activation-shape changes), 3 layers split [2, 1], 3 micro-batches, whole-layer
    # recompute (the deprecated key, read as parallel.recompute=full)
    "lamemo-pp2-recompute": (1, 2, 1, ["model.n_layer=3", "data.mem_len=16", "data.micro_batches=3",
                                       "parallel.activation_checkpointing=true"]),
    # Transformer-XL: only the current rows travel; each stage caches its own layers' inputs; partition [1, 2]
    "xl-pp2": (1, 2, 1, ["model.variant=0", "model.n_layer=3", "parallel.pipeline_partition=[1,2]",
                         "data.mem_len=12"]),
    # tensor parallel inside the stages: heads of C-bar / Z-bar split, vocabulary-parallel embedding and loss
    "lamemo-tp2-pp2": (2, 2, 1, ["model.n_layer=3"]),
    # two pipelines with ZeRO-1; a memory shorter than the segment (look-ahead window 1..M)
    "lamemo-pp2-dp2-zero1": (1, 2, 2, ["parallel.zero_stage=1", "data.mem_len=5"]),
}


def _run_and_reference(corpus, run_dir, tp, pp, dp, extra, monkeypatch):
    overrides = base_overrides(corpus, run_dir) + [f"parallel.tensor={tp}", f"parallel.pipeline={pp}", *extra,
                                                   *eval_overrides(corpus)]
    monkeypatch.setenv("LAMEMO_DUMP_MEMORY", str(run_dir / "memory"))
    result = launch(tp * pp * dp, overrides)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    config = load_config(ROOT / "configs" / "tiny-cpu.yaml", overrides)
    config.model.vocab_size = 257
    return config, reference_run(config, STEPS, dp_size=dp)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("name", list(PIPELINE_LAYOUTS))
def test_pipeline_matches_single_device(corpus, tmp_path, monkeypatch, name):
    tp, pp, dp, extra = PIPELINE_LAYOUTS[name]
    run_dir = tmp_path / "run"
    config, (ref_losses, ref_state, ref_memory) = _run_and_reference(corpus, run_dir, tp, pp, dp, extra, monkeypatch)

    losses = read_losses(run_dir)
    assert len(losses) == STEPS
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=1e-6)

    exported = LaMemoModel.from_pretrained(run_dir / "final").state_dict()
    assert sorted(exported) == sorted(ref_state)
    for key, tensor in ref_state.items():
        torch.testing.assert_close(exported[key], tensor, rtol=1e-5, atol=1e-5, msg=lambda m: f"{key}: {m}")

    # The memory after the last step: every data-parallel rank's slots (micro-batch order), all layers and
    # heads, against the reference's memory of all streams (rank-major, then micro-batch).
    parts = [LaMemoMemory.load(run_dir / "memory" / f"memory-dp{r}.safetensors") for r in range(dp)]
    memory, expected = LaMemoMemory.concat_rows(parts).tensors(), ref_memory.tensors()
    assert sorted(memory) == sorted(expected)
    assert expected["embeddings"].shape[1] == min(config.data.mem_len, STEPS * config.data.tgt_len)
    for key, tensor in expected.items():
        torch.testing.assert_close(memory[key], tensor, rtol=1e-5, atol=1e-5, msg=lambda m: f"memory {key}: {m}")
    # evaluation through the pipeline (all stages and TP ranks, DP ranks splitting the streams), with its own
    # memory: the losses after the evaluations at steps 2 and 4 matched the reference above
    assert_eval_matches_export(run_dir, corpus, config, dp)


@pytest.mark.slow
@pytest.mark.distributed
def test_selective_recompute_gives_identical_runs(corpus, tmp_path):
    """Selective recompute (the attention core of every layer of both stages) reads the memory it was given at
    forward time and redraws the same dropout masks (dropout on everywhere, the memory filling up over the
    steps): losses and every weight after the run, the global biases included, are bitwise those without."""
    runs = {}
    for recompute in ("none", "attention"):
        run_dir = tmp_path / f"recompute-{recompute}"
        overrides = base_overrides(corpus, run_dir) + [
            "parallel.pipeline=2", "model.n_layer=3", "data.mem_len=16", "model.dropout=0.1", "model.dropatt=0.1",
            f"parallel.recompute={recompute}"]
        result = launch(2, overrides)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
        runs[recompute] = (read_losses(run_dir), LaMemoModel.from_pretrained(run_dir / "final").state_dict())
    (losses_off, weights_off), (losses_on, weights_on) = runs["none"], runs["attention"]
    assert len(losses_off) == STEPS and losses_on == losses_off
    assert sorted(weights_on) == sorted(weights_off)
    assert [k for k in weights_off if not torch.equal(weights_on[k], weights_off[k])] == []


# ---------------------------------------------------------------------------------------------- in-process
def test_stage_memory_keeps_the_newest_rows_and_refuses_foreign_state():
    from lamemo_parallel.pipeline_runtime import StageMemory
    store = StageMemory(2, ["vectors.2", "log_normalizers.2"], mem_len=3)
    assert store.length() == 0
    rows = torch.arange(5.0).view(1, 5, 1, 1).expand(2, 5, 2, 4)
    store.commit(0, {"vectors.2": rows, "log_normalizers.2": rows[..., 0]})
    with pytest.raises(RuntimeError, match="different lengths"):
        store.length()
    store.commit(1, {"vectors.2": rows, "log_normalizers.2": rows[..., 0]})
    assert store.length() == 3 and store.get(1)["vectors.2"][0, :, 0, 0].tolist() == [2.0, 3.0, 4.0]
    state = store.state()
    with pytest.raises(ValueError, match="another pipeline partition"):
        StageMemory(2, ["vectors.0", "log_normalizers.0"], mem_len=3).load_state(state)
    with pytest.raises(ValueError, match="3 micro-batch slots"):
        store.load_state(state + [None])
    fresh = StageMemory(2, ["vectors.2", "log_normalizers.2"], mem_len=3)
    fresh.load_state(state)
    assert torch.equal(fresh.get(0)["vectors.2"], store.get(0)["vectors.2"])


def test_pipeline_engine_reset_memory_empties_each_stage_store():
    """data.span_memory=reset: every rank calls the engine's reset_memory at the same steps; on each stage (the
    first with its look-ahead embeddings FIFO, the last) it empties every micro-batch slot of that stage's store."""
    from types import SimpleNamespace
    from lamemo_parallel.pipeline_runtime import StageRuntime
    from pretrain.engines.pipeline import PipelineEngine
    config = LaMemoConfig(vocab_size=50, n_layer=2, d_model=16, n_head=4, d_inner=32, tgt_len=4, mem_len=4)
    for stage in range(2):
        runtime = StageRuntime(config, stage=stage, num_stages=2, layers=range(stage, stage + 1), micro_batches=2,
                               mem_len=4, n_local_heads=4)
        for slot in range(2):
            runtime.memory.commit(slot, {n: torch.ones(3, 6, 16) for n in runtime.memory.names})
        assert runtime.memory_length() == 4 and ("embeddings" in runtime.memory.names) == (stage == 0)
        PipelineEngine.reset_memory(SimpleNamespace(runtime=runtime))
        assert runtime.memory_length() == 0 and runtime.memory.slots == [None, None]


def test_position_dropout_mask_is_shared_by_all_stages():
    """docs/method.md §2: one positional dropout mask per step, shared by every layer, so by every pipeline stage."""
    from lamemo_parallel.pipeline_runtime import StageRuntime
    config = LaMemoConfig(vocab_size=11, n_layer=4, d_model=8, n_head=2, d_inner=16, dropout=0.5)

    def table(stage, step, slot):
        runtime = StageRuntime(config, stage=stage, num_stages=2, layers=range(2 * stage, 2 * stage + 2),
                               micro_batches=2, mem_len=4, n_local_heads=2, seed=7)
        runtime.begin_step(step)
        torch.manual_seed(100 + stage)            # the stages' own generators differ
        positions = runtime._positions(4, 4, torch.float32, torch.device("cpu"), slot, training=True)
        return torch.cat([positions.causal, positions.lookahead])

    assert torch.equal(table(0, 3, 1), table(1, 3, 1))
    assert not torch.equal(table(0, 3, 1), table(0, 3, 0)) and not torch.equal(table(0, 3, 1), table(0, 4, 1))
    assert (table(0, 3, 1) == 0).any()
