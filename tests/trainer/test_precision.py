"""Mixed precision done right: fp32 sinusoids in a bf16 model, fp32 gradient accumulation and all-reduce under
bf16 (DeepSpeed's data_types.grad_accum_dtype / communication_data_type, checked on a real 2-rank engine)."""
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import ROOT, free_port

from lamemo_parallel import LaMemoConfig, LaMemoModel
from pretrain.config import load_config
from pretrain.engines import deepspeed_config
from pretrain.layout import Layout


def test_bf16_model_keeps_fp32_frequencies_and_distinct_sinusoids_for_every_distance():
    config = LaMemoConfig(vocab_size=11, n_layer=1, d_model=64, n_head=2, d_inner=16)   # d_model 64: 32 frequencies
    reference = LaMemoModel(config).position_encodings(512, 512, torch.float32).causal   # distances 1023..0
    model = LaMemoModel(config).to(torch.bfloat16)
    assert model.inv_freq.dtype == torch.float32
    table = model.position_encodings(512, 512, torch.bfloat16).causal
    assert table.dtype == torch.bfloat16 and table.shape[0] == 1024
    assert torch.unique(table, dim=0).shape[0] == 1024          # no two distances share an encoding
    torch.testing.assert_close(table.float(), reference, atol=4e-3, rtol=0)   # bf16 rounding of the values only
    # what a bf16 frequency table would do (the bug this guards against): distances collapse onto neighbours
    rounded = torch.outer(torch.arange(1023, -1, -1.0).to(torch.bfloat16), model.inv_freq.to(torch.bfloat16))
    assert torch.unique(torch.cat([rounded.sin(), rounded.cos()], -1), dim=0).shape[0] < 900


def test_bf16_deepspeed_config_accumulates_and_reduces_in_fp32():
    config = load_config(ROOT / "configs" / "tiny-cpu.yaml", ["parallel.precision=bf16", "parallel.zero_stage=0"])
    ds = deepspeed_config(config, Layout(world_size=2, tensor=1, pipeline=1, data=2))
    assert ds["bf16"]["enabled"] and ds["data_types"] == {"grad_accum_dtype": "fp32"}
    assert ds["communication_data_type"] == "fp32" and ds["zero_optimization"]["stage"] == 1
    fp32 = deepspeed_config(load_config(ROOT / "configs" / "tiny-cpu.yaml", []), Layout(world_size=2, tensor=1, pipeline=1, data=2))
    assert "data_types" not in fp32 and not fp32["bf16"]["enabled"] and fp32["zero_optimization"]["stage"] == 0


def _worker(rank, world, port, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from pretrain.engines import PlainEngine
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {}
        for zero in (0, 2):
            config = load_config(ROOT / "configs" / "tiny-cpu.yaml", [
                "parallel.precision=bf16", f"parallel.zero_stage={zero}", "model.n_layer=1", "model.d_model=16",
                "model.n_head=2", "model.d_inner=16", "data.micro_batches=2", "data.micro_batch_size=1",
                "data.tgt_len=4", "data.mem_len=4", "model.vocab_size=31"])
            engine = PlainEngine(config, Layout(world_size=world, tensor=1, pipeline=1, data=world), 31, torch.device("cpu"))
            opt = engine.optimizer
            tokens = torch.randint(0, 31, (2, 1, 5), generator=torch.Generator().manual_seed(rank))
            result = engine.train_step([(t[:, :-1], t[:, 1:]) for t in tokens])
            results[zero] = {
                "optimizer": type(opt).__name__,
                "grad_accum": getattr(opt, "grad_acc_dtype", getattr(opt, "gradient_accumulation_dtype", None)),
                "communication": engine._deepspeed.communication_data_type,
                "param_dtype": next(engine.module.parameters()).dtype,
                "loss": result.loss,
            }
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.distributed
def test_bf16_engine_accumulates_and_all_reduces_gradients_in_fp32(tmp_path):
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    results = torch.load(tmp_path / "rank0.pt")
    for zero, r in results.items():
        assert r["param_dtype"] == torch.bfloat16, zero
        assert r["grad_accum"] == torch.float32 and r["communication"] == torch.float32, (zero, r)
        assert torch.isfinite(torch.tensor(r["loss"]))
    assert results[0]["optimizer"] == "BF16_Optimizer"
