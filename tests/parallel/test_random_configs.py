"""Property test: random small configurations (variant, N, M, micro-batches, layout) on 1, 2 and 4 processes train
a few finite steps whose losses and final weights equal the single-device reference (fp32, dropout off).

One trainer launch per world size keeps it cheap; the draws come from ``LAMEMO_PROPERTY_SEED`` (default 0) and
are printed, so a failure is reproducible with the same seed."""
from __future__ import annotations

import math
import os
import random

import pytest
import torch
from helpers import TINY_CONFIG, base_overrides, launch, read_losses
from train_reference import reference_run

from lamemo_parallel import LaMemoModel
from pretrain.config import load_config

STEPS = 3
LAYOUTS = {  # world size -> (tensor, pipeline, zero stage) choices; data = world / (tensor x pipeline)
    1: [(1, 1, 0)],
    2: [(2, 1, 0), (1, 2, 0), (1, 1, 1), (1, 1, 2)],
    4: [(2, 2, 0), (2, 1, 1), (1, 2, 1), (1, 1, 3)],
}


def draw(world: int, rng: random.Random) -> list[str]:
    tensor, pipeline, zero = rng.choice(LAYOUTS[world])
    variant = rng.choice([0, 3, 31, 32, 33])
    tgt_len = rng.choice([4, 6, 8])
    mem_choices = [tgt_len, 2 * tgt_len] if variant == 33 else [0, tgt_len // 2, tgt_len, 2 * tgt_len]
    return [f"model.variant={variant}", f"data.tgt_len={tgt_len}", f"data.mem_len={rng.choice(mem_choices)}",
            f"data.micro_batches={rng.choice([1, 2])}", f"parallel.tensor={tensor}", f"parallel.pipeline={pipeline}",
            f"parallel.zero_stage={zero}", f"run.steps={STEPS}", f"model.pre_lnorm={rng.choice(['true', 'false'])}"]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("world", [1, 2, 4])
def test_random_config_matches_single_device(corpus, tmp_path, world):
    seed = int(os.environ.get("LAMEMO_PROPERTY_SEED", "0"))
    choice = draw(world, random.Random(seed * 1000 + world))
    print(f"LAMEMO_PROPERTY_SEED={seed} world {world}: {' '.join(choice)}")
    run_dir = tmp_path / "run"
    overrides = base_overrides(corpus, run_dir) + choice
    result = launch(world, overrides)
    assert result.returncode == 0, " ".join(choice) + "\n" + result.stderr[-4000:]
    losses = read_losses(run_dir)
    assert len(losses) == STEPS and all(math.isfinite(x) for x in losses), (choice, losses)
    config = load_config(TINY_CONFIG, overrides)
    config.model.vocab_size = 257
    data = world // (config.parallel.tensor * config.parallel.pipeline)
    ref_losses, ref_state, _ = reference_run(config, STEPS, dp_size=data)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=1e-6,
                               msg=lambda m: f"{' '.join(choice)}: {m}")
    exported = LaMemoModel.from_pretrained(run_dir / "final").state_dict()
    for name, tensor in ref_state.items():
        torch.testing.assert_close(exported[name], tensor, rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"{' '.join(choice)} {name}: {m}")
