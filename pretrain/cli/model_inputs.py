"""What the tools that score or sample a model share: the model directory read with every problem as one
line, the tokenizer that belongs to it, and a token file checked against the same tokenizer.

A model and a tokenizer belong together when the vocabulary sizes agree and, for an export that recorded it
(``export.json``: ``tokenizer_fingerprint``), the fingerprints agree; a token file, when its ``.meta.json``
names the same fingerprint. A model directory without ``tokenizer/`` is refused for text unless ``--tokenizer``
names one (a token file needs no tokenizer).
"""
from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open

from lamemo_parallel import LaMemoModel
from lamemo_parallel.model_files import WEIGHTS_NAME, ModelFileError

from pretrain.data.errors import DataError
from pretrain.data.indexed import read_meta
from pretrain.data.tokenizer import check_vocab_matches, load_tokenizer


def load_model(model_dir: str | Path, device=None) -> LaMemoModel:
    """``LaMemoModel.from_pretrained``; a missing, truncated or damaged file is an OSError / ValueError with
    one line (lamemo_parallel.model_files). For an export, the weights and export.json must name the same
    source checkpoint (its manifest hash is in both)."""
    model = LaMemoModel.from_pretrained(model_dir, device=device)
    recorded = export_record(model_dir, "checkpoint_manifest_sha256")
    if recorded is not None:
        with safe_open(str(Path(model_dir) / WEIGHTS_NAME), framework="pt") as f:
            in_weights = (f.metadata() or {}).get("checkpoint_manifest_sha256")
        if in_weights != recorded:
            raise ModelFileError(f"{model_dir}: {WEIGHTS_NAME} and export.json come from different checkpoints "
                                 f"(manifest {str(in_weights)[:12]} against {recorded[:12]}); export it again")
    return model


def export_record(model_dir: str | Path, key: str) -> str | None:
    """One string field of the model directory's export.json (None without the file or the field)."""
    try:
        info = json.loads((Path(model_dir) / "export.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    value = info.get(key) if isinstance(info, dict) else None
    return value if isinstance(value, str) else None


def recorded_fingerprint(model_dir: str | Path) -> str | None:
    """The tokenizer fingerprint the export recorded (None for a model directory without one)."""
    return export_record(model_dir, "tokenizer_fingerprint")


def model_tokenizer(model_dir: str | Path, tokenizer_dir: str | Path | None, vocab_size: int, *,
                    alternative: str = ""):
    """The tokenizer for ``model_dir`` (``tokenizer_dir`` or MODEL/tokenizer), refused unless it belongs to
    the model. ``alternative`` names what the user could give instead of a tokenizer (for the message)."""
    directory = Path(tokenizer_dir) if tokenizer_dir else Path(model_dir) / "tokenizer"
    if not tokenizer_dir and not directory.is_dir():
        raise DataError(f"{model_dir} has no tokenizer/ directory: pass --tokenizer DIR (the tokenizer the model "
                        f"was trained with){alternative}")
    tokenizer = load_tokenizer(directory)
    check_vocab_matches(tokenizer, vocab_size)
    recorded = recorded_fingerprint(model_dir)
    if recorded is not None and tokenizer.fingerprint() != recorded:
        raise DataError(f"tokenizer {directory} is not the one {model_dir} was trained with (fingerprint "
                        f"{tokenizer.fingerprint()[:12]}, export.json records {recorded[:12]})")
    return tokenizer


def check_token_file(prefix: str | Path, model_dir: str | Path) -> None:
    """Without a tokenizer at hand, a token file made with another tokenizer than the one the export recorded
    is refused (with one, ``load_tokens(prefix, tokenizer=...)`` checks it)."""
    expected, made_with = recorded_fingerprint(model_dir), read_meta(prefix)["tokenizer_fingerprint"]
    if expected is not None and made_with != expected:
        raise DataError(f"{prefix} was tokenized with a different tokenizer than the one {model_dir} was exported "
                        f"with (fingerprint {made_with[:12]}, export.json records {expected[:12]})")
