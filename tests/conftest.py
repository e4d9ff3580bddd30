"""Shared helpers for the tests/test_data_*.py files (imported by them; pytest has no conftest here).

The real corpora ship with the repository in ``tests/data`` (xz-compressed, licences and provenance in
``tests/data/README.md``); tests read them in place.
"""

from __future__ import annotations

import importlib.util
import lzma
from pathlib import Path
from types import ModuleType

import pytest

from pretrain.data.tokenizer import Tokenizer, train_tokenizer

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"
WIKITEXT2 = DATA / "wikitext-2"
SHAKESPEARE = DATA / "tinyshakespeare" / "input.txt.xz"

# Published WikiText-2 numbers (pytorch word_language_model counts: words + one <eos> per line).
WT2_TOKENS = {"train": 2_088_628, "valid": 217_646, "test": 245_569}
WT2_VOCAB = 33_278


def shakespeare_text(limit: int | None = None) -> str:
    """Tiny Shakespeare (1.1 MB), or its first ``limit`` characters."""
    text = lzma.open(SHAKESPEARE, "rt", encoding="utf-8").read()
    return text if limit is None else text[:limit]


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


def concat_documents(tokenizer: Tokenizer, texts: list[str]) -> list[int]:
    """What a token file of these documents must hold: each document's ids ending with <eos>."""
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer.encode_document(text))
    return ids


def load_tool(name: str) -> ModuleType:
    """Import ``tools/<name>.py`` by path (``tools`` is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"tool_{name}", REPO / "tools" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
