"""The validation split is loaded once, by start-up's data check, and every evaluation scores what it loaded."""
import functools
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lamemo_parallel import LaMemoModel
from lamemo_parallel.inference import evaluate_streams, evaluate_tokens
from pretrain.config import load_config, model_config
from pretrain.data.indexed import load_tokens
from pretrain.preflight import check_data
from pretrain.trainer import evaluate_validation

from helpers import TINY_CONFIG, base_overrides


def test_evaluation_scores_the_sources_loaded_at_start_up(corpus, tmp_path):
    """A prefix is one source named after its stem, a list is one source each; the evaluation reads nothing
    again (the token files may even be gone) and gives the single-device figures of each source."""
    for suffix in (".bin", ".idx", ".meta.json"):
        shutil.copy(corpus / f"train{suffix}", tmp_path / f"held{suffix}")
    valid = tmp_path / "held"
    overrides = [*base_overrides(corpus, tmp_path / "run"), "run.eval_tokens=300", "run.eval_batch_size=2"]
    prefix = check_data(load_config(TINY_CONFIG, [*overrides, f"data.valid={valid}"]), verify_checksums=False).valid
    config = load_config(TINY_CONFIG, [*overrides, f"data.valid=[{{name: a, path: {valid}}}, "
                                                   f"{{name: b, path: {corpus / 'train'}}}]"])
    listed = check_data(config, verify_checksums=False).valid
    assert [(s.name, s.prefixes) for s in prefix] == [("held", (str(valid),))]
    assert [s.name for s in listed] == ["a", "b"]
    expected = load_tokens(valid)
    assert all(np.array_equal(s.tokens, expected) for s in (*prefix, *listed))

    torch.manual_seed(0)
    model = LaMemoModel(model_config(config, config.model.vocab_size)).eval()
    # the plain engine's evaluate is evaluate_streams over its module (pretrain/engines/plain.py)
    engine = SimpleNamespace(layout=SimpleNamespace(data=1), dp_rank=0, device=torch.device("cpu"),
                             evaluate=functools.partial(evaluate_streams, model))
    for suffix in (".bin", ".idx", ".meta.json"):
        (tmp_path / f"held{suffix}").unlink()            # mapped at start-up: nothing is opened again
    metrics = evaluate_validation(engine, config, listed)
    direct = evaluate_tokens(model, torch.from_numpy(expected[:301].astype(np.int64)), tgt_len=8, mem_len=8,
                             batch_size=2)
    assert metrics["valid/a/loss"] == pytest.approx(direct.loss, rel=1e-6)
    assert metrics["valid/b/loss"] == metrics["valid/a/loss"]           # the same tokens
    assert metrics["eval_tokens"] == 2 * direct.n_tokens == 2 * 300
    assert evaluate_validation(engine, config, None) is None
