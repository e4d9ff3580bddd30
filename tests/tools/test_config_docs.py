"""docs/config.md is generated from the config dataclasses; it must match what the generator writes now."""
import dataclasses

import pytest

from pretrain.cli import config_docs
from pretrain.config import TrainConfig


def test_config_docs_are_up_to_date():
    text = config_docs.render()
    assert config_docs.DOC_PATH.read_text(encoding="utf-8") == text, (
        f"docs/config.md is out of date: regenerate it with `{config_docs.REGENERATE}`")
    for section in dataclasses.fields(TrainConfig):           # every key has its row
        for f in dataclasses.fields(section.default_factory):
            assert f"| `{section.name}.{f.name}` |" in text


def test_a_field_without_description_is_refused(monkeypatch):
    @dataclasses.dataclass
    class Extra:
        documented: int = 1
        """Has a description."""
        undocumented: int = 2

    @dataclasses.dataclass
    class Config(TrainConfig):
        extra: Extra = dataclasses.field(default_factory=Extra)

    monkeypatch.setattr(config_docs, "TrainConfig", Config)
    with pytest.raises(ValueError, match=r"extra\.undocumented") as err:
        config_docs.render()
    assert "extra.documented" not in str(err.value)
