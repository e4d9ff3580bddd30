"""Fixtures shared by every test folder: the shipped corpora, real tokenizers trained on them, and a tiny
byte-level token file for the trainer tests.

The real corpora ship with the repository in ``tests/data`` (xz-compressed, licences and provenance in
``tests/data/README.md``); tests read them in place. Plain helpers (launchers, loss readers, paths, ports) are
in ``tests/helpers.py``. Markers (pyproject.toml): ``slow`` (left out of the quick loop ``pytest -m "not
slow"``), ``distributed`` (several processes: torchrun / DeepSpeed / gloo), ``slurm`` (the local SLURM cluster).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import ROOT, WIKITEXT2, free_port, shakespeare_text, tiny_config as _tiny_config, tiny_model as _tiny_model

from pretrain.data.tokenizer import train_tokenizer


@pytest.fixture(scope="session")
def root() -> Path:
    """The repository's root folder."""
    return ROOT


@pytest.fixture
def port() -> int:
    """A free TCP port on 127.0.0.1."""
    return free_port()


@pytest.fixture(scope="session")
def shakespeare_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny Shakespeare decompressed into a temporary file."""
    path = tmp_path_factory.mktemp("corpus") / "shakespeare.txt"
    path.write_text(shakespeare_text(), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def bpe_dir(tmp_path_factory: pytest.TempPathFactory, shakespeare_file: Path) -> Path:
    """A real sentencepiece BPE tokenizer (vocab 1000) trained on Tiny Shakespeare, saved to a folder."""
    out = tmp_path_factory.mktemp("bpe")
    train_tokenizer("bpe", [shakespeare_file], out, vocab_size=1000, character_coverage=1.0)
    return out


@pytest.fixture(scope="session")
def wt2_word_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The WikiText-2 word-level tokenizer, vocabulary from the (xz) train split only."""
    out = tmp_path_factory.mktemp("wt2word")
    train_tokenizer("word", [WIKITEXT2 / "train.txt.xz"], out)
    return out


@pytest.fixture(scope="session")
def byte_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The byte-level tokenizer, saved to a folder."""
    out = tmp_path_factory.mktemp("byte")
    train_tokenizer("byte", [], out)
    return out


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level token file made from the first 60 kB of Tiny Shakespeare: ``corpus / 'train'`` (token file
    prefix) and ``corpus / 'tok'`` (tokenizer) for the trainer tests."""
    from pretrain.data.indexed import preprocess

    work = tmp_path_factory.mktemp("trainer-corpus")
    (work / "train.txt").write_text(shakespeare_text(60000))
    train_tokenizer("byte", [work / "train.txt"], work / "tok")
    preprocess([work / "train.txt"], work / "tok", work / "train", workers=1)
    return work


@pytest.fixture
def tiny_config():
    """The one tiny-model factory: ``tiny_config(vocab_size, **overrides)`` -> LaMemoConfig (tests/helpers.py)."""
    return _tiny_config


@pytest.fixture
def tiny_model():
    """``tiny_model(vocab_size, size=MATH_MODEL, *, seed=0, perturb=0.1, **overrides)`` -> LaMemoModel in eval mode
    (tests/helpers.py)."""
    return _tiny_model
