"""The trainer (real DeepSpeed, real megatron-core, gloo on CPU) against the single-device reference.

Each layout is one real `torchrun` launch of `python -m pretrain.train`; per-step losses (metrics.jsonl)
and final weights (the exported single-device directory) must equal a plain-torch run over the same global
batch to ~1e-5 relative (fp32, dropout off; the only differences are summation orders of the gradient
reductions)."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from lamemo_parallel import LaMemoModel
from pretrain.config import TrainConfigError, load_config
from pretrain.layout import resolve_layout, split_layers
from train_reference import reference_run

from helpers import BASE_STEPS as STEPS
from helpers import (ROOT, assert_eval_matches_export, base_overrides, eval_overrides, launch, launcher, one_error,
                     read_losses, subprocess_env)

LAYOUTS = [  # (tensor, pipeline, data, zero stage)
    (1, 1, 1, 0),
    (1, 1, 2, 1),
    (1, 1, 2, 2),
    (1, 1, 2, 3),
    (2, 1, 1, 0),
    (2, 1, 2, 1),
    (2, 1, 1, 3),
]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("tp,pp,dp,zero", LAYOUTS)
def test_layout_matches_single_device(corpus, tmp_path, tp, pp, dp, zero):
    run_dir = tmp_path / "run"
    overrides = base_overrides(corpus, run_dir) + [f"parallel.tensor={tp}", f"parallel.pipeline={pp}",
                                                   f"parallel.zero_stage={zero}", *eval_overrides(corpus)]
    result = launch(tp * pp * dp, overrides)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    losses = read_losses(run_dir)
    config = load_config(ROOT / "configs" / "tiny-cpu.yaml", overrides)
    config.model.vocab_size = 257
    ref_losses, ref_state, _ = reference_run(config, STEPS, dp_size=dp)
    assert len(losses) == STEPS
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=1e-6)
    exported = LaMemoModel.from_pretrained(run_dir / "final").state_dict()
    # Adam divides each coordinate's update by its gradient RMS: a coordinate whose gradient is at rounding
    # level moves by up to ~lr with its rounding noise at full relative size. atol = lr / 300 bounds that;
    # everything else is held at 1e-5 relative.
    for name, tensor in ref_state.items():
        torch.testing.assert_close(exported[name], tensor, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
    assert_eval_matches_export(run_dir, corpus, config, dp)      # evaluation through the parallel model


def test_impossible_layouts_fail_with_one_message():
    def layout(world, **parallel):
        overrides = [f"parallel.{k}={v}" for k, v in parallel.items()]
        return resolve_layout(load_config(ROOT / "configs" / "tiny-cpu.yaml", overrides), world, cuda=False)

    assert layout(8, tensor=2, pipeline=2).data == 2
    with pytest.raises(TrainConfigError, match="n_head=4 is not divisible by the tensor-parallel size 3"):
        layout(3, tensor=3)
    with pytest.raises(TrainConfigError, match="n_layer=4 is fewer than the 8 pipeline stages"):
        layout(8, pipeline=8)
    with pytest.raises(TrainConfigError, match="d_inner=1022 is not divisible by the tensor-parallel size 4"):
        resolve_layout(load_config(ROOT / "configs" / "tiny-cpu.yaml", ["parallel.tensor=4", "model.d_inner=1022"]),
                       4, cuda=False)
    with pytest.raises(TrainConfigError, match="attention_backend=flex needs a GPU to train"):
        layout(1, attention_backend="flex")
    with pytest.raises(TrainConfigError, match="world size 6 is not divisible"):
        layout(6, tensor=4)
    with pytest.raises(TrainConfigError, match="ZeRO stage 2 cannot be combined with pipelining"):
        layout(4, pipeline=2, zero_stage=2)
    with pytest.raises(TrainConfigError, match="fp16 needs a GPU"):
        layout(1, precision="fp16")
    assert [list(r) for r in split_layers(5, 2)] == [[0, 1, 2], [3, 4]]


@pytest.mark.slow
@pytest.mark.distributed
def test_trainer_reports_bad_layout_and_config_at_startup(corpus, tmp_path):
    """An indivisible layout stops all 4 trainers under the project's launcher before anything is built, with
    one error line (the launcher's summary aside), exit 2; ``--dry-run`` says the same in one process."""
    bad_layout = ["parallel.tensor=4", "model.d_inner=1022"]
    result = launcher(4, base_overrides(corpus, tmp_path / "r") + bad_layout)
    expected = "model.d_inner=1022 is not divisible by the tensor-parallel size 4"
    assert result.returncode == 2 and expected in one_error(result), result.stderr[-3000:]
    assert str(ROOT / "pretrain") not in result.stderr and not (tmp_path / "r").exists()
    dry = subprocess.run([sys.executable, "-m", "pretrain.train", "--config", str(ROOT / "configs" / "tiny-cpu.yaml"),
                          "--dry-run", *base_overrides(corpus, tmp_path / "r"), *bad_layout],
                         capture_output=True, text=True, cwd=ROOT, env=subprocess_env(WORLD_SIZE="4"))
    assert dry.returncode == 2 and dry.stderr.splitlines() == [one_error(result)], dry.stderr
    bad = subprocess.run([sys.executable, "-m", "pretrain.train", "--config", str(tmp_path / "missing.yaml")],
                         capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "config file not found" in bad.stderr and "Traceback" not in bad.stderr
    unknown = subprocess.run([sys.executable, "-m", "pretrain.train", "--config",
                              str(ROOT / "configs" / "tiny-cpu.yaml"), "optim.lrr=3"],
                             capture_output=True, text=True, cwd=ROOT)
    assert unknown.returncode == 2 and "unknown config key 'optim.lrr'" in unknown.stderr


@pytest.mark.slow
@pytest.mark.distributed
def test_selective_recompute_and_bf16_in_the_trainer(corpus, tmp_path):
    """Tensor-parallel run with dropout on (each rank's split attention-dropout masks redrawn by the recompute):
    selective recompute (parallel.recompute=attention) and none give bitwise identical losses.
    bf16 trains: its losses follow the float32 single-device reference to bf16 precision and go down over the
    8 steps, while the memory's Z-bar stays float32."""
    runs = {}
    for recompute in ("none", "attention"):
        run_dir = tmp_path / f"ckpt-{recompute}"
        args = base_overrides(corpus, run_dir) + ["parallel.tensor=2", "model.dropout=0.1", "model.dropatt=0.1",
                                                  f"parallel.recompute={recompute}"]
        result = launch(2, args)
        assert result.returncode == 0, result.stderr[-4000:]
        runs[recompute] = read_losses(run_dir)
    assert len(runs["none"]) > 0 and runs["none"] == runs["attention"]

    run_dir = tmp_path / "bf16"
    overrides = base_overrides(corpus, run_dir) + ["parallel.precision=bf16", "run.steps=8"]
    result = launch(1, overrides)
    assert result.returncode == 0, result.stderr[-4000:]
    losses = torch.tensor(read_losses(run_dir))
    assert len(losses) == 8 and torch.isfinite(losses).all()
    config = load_config(ROOT / "configs" / "tiny-cpu.yaml", overrides)
    config.model.vocab_size = 257
    fp32_losses = torch.tensor(reference_run(config, 8, dp_size=1)[0])     # plain torch, float32
    torch.testing.assert_close(losses, fp32_losses, rtol=1e-2, atol=0)
    assert losses[-3:].mean() < losses[:3].mean() - 0.05, losses.tolist()      # it learns (5.55 -> 5.45)
    state = torch.load(run_dir / "checkpoints" / "step_00000008" / "trainer_state_rank_00000.pt", weights_only=False)
    slot = state["memory"][0]
    assert slot["embeddings"].dtype == torch.bfloat16 and slot["vectors.0"].dtype == torch.bfloat16
    assert slot["log_normalizers.0"].dtype == torch.float32
