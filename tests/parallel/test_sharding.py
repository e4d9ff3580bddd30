"""The sharding table (lamemo_parallel/sharding.py) and initialisation straight into shards (init.py).

In-process: the table names every parameter of the single-device model with its shape, and TP slices merge
back to the full tensor for TP 1 / 2 / 4 and variants 0 / 3 / 32. One 4-rank launch (TP 2 x PP 2, gloo):
the tensor-parallel model and the pipeline stages hold exactly the table's tensors (names, local shapes,
owning stages, megatron's split attributes), and their initial weights are the slices of the single-device
model's at the same seed.
"""
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lamemo_parallel import LaMemoConfig, LaMemoModel
from lamemo_parallel.sharding import ParamShard, merge, pipeline_name, shard, sharding_table, stage_names, stage_plan


def make_config(variant, **overrides):
    # its own size: 4 heads of 4 split over TP 2 and 4, and 3 layers give uneven pipeline stages
    cfg = dict(vocab_size=41, n_layer=3, d_model=16, n_head=4, d_head=4, d_inner=24, variant=variant, init_std=0.3)
    cfg.update(overrides)
    return LaMemoConfig(**cfg)


@pytest.mark.parametrize("variant", [0, 3, 31, 32, 33])
def test_table_names_every_parameter_with_its_shape(variant):
    config = make_config(variant)
    state = LaMemoModel(config).state_dict()
    table = sharding_table(config, tp_size=2, parts=[range(0, 2), range(2, 3)])
    assert list(table) == list(state)                          # every name, in state-dict order
    assert {k: e.shape for k, e in table.items()} == {k: tuple(v.shape) for k, v in state.items()}
    assert table["embedding.weight"].stages == (0, 1) and table["output_bias"].stages == (1,)
    assert table["content_bias"].stages == (0, 1) and table["layers.2.ff.fc1.weight"].stages == (1,)
    assert table["embedding.weight"].padded == 42 and table["embedding.weight"].local_shape(2) == (21, 16)
    assert table["layers.0.attn.o_proj.weight"].split_dim == 1 and table["layers.0.ff.fc2.bias"].split_dim is None


@pytest.mark.parametrize("variant", [0, 3, 32])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_merge_of_slices_is_the_full_tensor(variant, tp):
    config = make_config(variant)
    state = LaMemoModel(config).state_dict()
    for name, entry in sharding_table(config, tp_size=tp).items():
        full = torch.randn(entry.shape)          # distinct values, so a wrong order or offset shows
        slices = [shard(entry, full, r, tp) for r in range(tp)]
        assert all(tuple(s.shape) == entry.local_shape(tp) for s in slices), name
        assert torch.equal(merge(entry, slices), full), name
        if entry.split_dim is not None and tp > 1:
            assert not torch.equal(slices[0], slices[1]), name
    assert set(sharding_table(config, tp_size=tp)) == set(state)


def test_fused_tensors_split_block_by_block():
    """A packed K|V [2 * H * d_h, d] gives every rank its heads of K and its heads of V."""
    entry = ParamShard("kv", (8, 3), 0, 8, 2, (0,), "normal")
    full = torch.arange(24.0).view(8, 3)
    first = shard(entry, full, 0, 2)
    assert torch.equal(first, torch.cat([full[0:2], full[4:6]]))
    assert torch.equal(merge(entry, [shard(entry, full, r, 2) for r in range(2)]), full)


def test_pipeline_names_follow_the_stage_plan():
    config = make_config(3)
    parts = [range(0, 2), range(2, 3)]
    plan = stage_plan(config.n_layer, parts)
    assert [k for k, _ in plan] == ["embedding", "biases", "decoder", "decoder", "exit",
                                    "biases", "decoder", "exit", "head", "output"]
    table = sharding_table(config, 2, parts)
    assert stage_names(table, 0) == ["content_bias", "position_bias", "future_position_bias", "embedding.weight",
                                     *[n for n in table if n.startswith(("layers.0.", "layers.1."))]]
    assert pipeline_name(config, "layers.2.attn.q_proj.weight", 1, parts) == "6.layer.attn.q_proj.weight"
    assert pipeline_name(config, "layers.1.ff.fc2.bias", 0, parts) == "3.layer.ff.fc2.bias"
    assert pipeline_name(config, "output_bias", 1, parts) == "9.output_bias"
    assert pipeline_name(config, "embedding.weight", 1, parts) == "tied_modules.embedding.embedding.weight"
    assert pipeline_name(config, "future_position_bias", 1, parts) == "tied_modules.biases.future_position_bias"
    for name, stage in [("layers.2.attn.q_proj.weight", 0), ("output_bias", 0), ("nothing", 1)]:
        with pytest.raises(KeyError):
            pipeline_name(config, name, stage, parts)


def test_initial_weights_do_not_depend_on_the_global_rng_after_one_draw():
    config = make_config(3)
    torch.manual_seed(5)
    a = LaMemoModel(config).state_dict()
    after = torch.rand(1)
    torch.manual_seed(5)
    b = LaMemoModel(config).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a) and torch.equal(torch.rand(1), after)
    c = LaMemoModel(config, init_seed=1234).state_dict()
    assert not torch.equal(a["layers.0.attn.q_proj.weight"], c["layers.0.attn.q_proj.weight"])
    assert torch.all(a["output_bias"] == 0) and torch.allclose(a["layers.0.ff.norm.weight"].mean(), torch.tensor(1.0),
                                                               atol=0.3)


# ============================================================================ 4 ranks: TP 2 x PP 2
PARTS = {3: [range(0, 2), range(2, 3)], 0: [range(0, 1), range(1, 3)], 32: [range(0, 1), range(1, 3)]}
SEED = 777
BUILDER_OVERRIDES = ["model.n_layer=2", "model.d_model=16", "model.n_head=4", "model.d_inner=32", "parallel.tensor=2",
                     "parallel.pipeline=2", "data.tgt_len=8", "data.mem_len=5", "data.micro_batches=2"]


def _worker(rank, world, port, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), CUDA_DEVICE_MAX_CONNECTIONS="1")
    torch.set_num_threads(1)
    import deepspeed
    import deepspeed.ops
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
    from megatron.core import parallel_state

    from helpers import TINY_CONFIG
    from lamemo_parallel.attention import attention_backend_of
    from lamemo_parallel.megatron_parts import MegatronParts, is_split
    from lamemo_parallel.pipeline import LaMemoPipelineModule
    from lamemo_parallel.tensor_parallel import TensorParallelLaMemoModel
    from pretrain.config import load_config
    from pretrain.engines import ModelBuilder
    from pretrain.layout import Layout
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
    try:
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
        results = {}
        for variant, parts in PARTS.items():
            config = make_config(variant)
            topology = PipeModelDataParallelTopology(num_pp=2, num_mp=2, num_dp=1)
            module = LaMemoPipelineModule(config, topology=topology, parts=parts, micro_batches=1,
                                          parallel=MegatronParts())
            module.initialize(SEED)
            tp_model = TensorParallelLaMemoModel(config, init_seed=SEED)
            results[variant] = {
                "stage": module.stage_id, "tp_rank": module.parallel.tp_rank,
                "pipeline": {name: p.detach().clone() for name, p in module.named_model_parameters().items()},
                "pipeline_module_names": {name for name, _ in module.named_parameters()},
                "pipeline_split": {name: (getattr(p, "partition_dim", None) if is_split(p) else None)
                                   for name, p in module.named_model_parameters().items()},
                "tp": {name: p.detach().clone() for name, p in tp_model.named_parameters()},
                "tp_split": {name: (p.partition_dim if is_split(p) else None)
                             for name, p in tp_model.named_parameters()},
            }
        # Both engines' model builder: the backend asked for and data.mem_len reach every stage and the TP model.
        train_config = load_config(TINY_CONFIG, [*BUILDER_OVERRIDES, "parallel.attention_backend=flex"])
        builder = ModelBuilder(train_config, Layout(world_size=4, tensor=2, pipeline=2, data=1), 41,
                               torch.device("cpu"))
        stage = builder.pipeline_stage(PipeModelDataParallelTopology(num_pp=2, num_mp=2, num_dp=1))
        tp_model = builder.model()
        results["builder"] = {"stage_backends": attention_backend_of(stage),
                              "stage_mem_len": stage.runtime.memory.mem_len,
                              "stage_layers": len(list(stage.runtime.layers)),
                              "model_backends": attention_backend_of(tp_model),
                              "model_mem_len": tp_model.config.mem_len, "model_tp": tp_model.parallel.tp_size}
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    from helpers import free_port
    out = tmp_path_factory.mktemp("sharding")
    mp.spawn(_worker, args=(4, free_port(), str(out)), nprocs=4, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(4)]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("variant", list(PARTS))
def test_parallel_models_hold_the_tables_slices_of_the_single_device_init(four_ranks, variant):
    config, parts = make_config(variant), PARTS[variant]
    table = sharding_table(config, 2, parts)
    full = LaMemoModel(config, init_seed=SEED).state_dict()
    for rank_results in four_ranks:
        r = rank_results[variant]
        stage, tp_rank = r["stage"], r["tp_rank"]
        # the pipeline stage: exactly the table's names for this stage, DeepSpeed's names, TP slices of the init
        assert list(r["pipeline"]) and sorted(r["pipeline"]) == sorted(stage_names(table, stage))
        assert r["pipeline_module_names"] == {pipeline_name(config, n, stage, parts) for n in r["pipeline"]}
        for name, tensor in r["pipeline"].items():
            assert r["pipeline_split"][name] == table[name].split_dim, name
            assert torch.equal(tensor, shard(table[name], full[name], tp_rank, 2)), name
        # the tensor-parallel model: every name, megatron's attributes agree with the table, slices of the init
        assert list(r["tp"]) == list(table)
        for name, tensor in r["tp"].items():
            assert r["tp_split"][name] == table[name].split_dim, name
            assert torch.equal(tensor, shard(table[name], full[name], tp_rank, 2)), name
    for name in table:          # merging the TP ranks' shards gives back the single-device init
        shards = [next(rr[variant]["tp"][name] for rr in four_ranks if rr[variant]["tp_rank"] == t) for t in (0, 1)]
        assert torch.equal(merge(table[name], shards), full[name]), name


@pytest.mark.slow
@pytest.mark.distributed
def test_model_builder_gives_every_stage_the_backend_and_memory_asked_for(four_ranks):
    """``ModelBuilder`` (both engines) with parallel.attention_backend=flex and data.mem_len=5 builds every
    pipeline stage and the tensor-parallel model with flex attention in every layer and a memory of 5 rows (on
    CPU the builder is tested directly: training with flex on CPU is refused at start-up, see
    tests/trainer/test_reliability.py)."""
    for rank_results in four_ranks:
        b = rank_results["builder"]
        assert b["stage_backends"] == {"flex"} and b["stage_layers"] == 1
        assert b["model_backends"] == {"flex"} and b["model_tp"] == 2
        assert b["stage_mem_len"] == 5 and b["model_mem_len"] == 5
