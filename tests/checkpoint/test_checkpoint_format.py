"""Checkpoint format pieces without a training run: the marker check, the hash split, write-failure messages,
safe loading of a planted payload and the streaming safetensors writer."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import PicklePayload

from pretrain.checkpoint import CheckpointError
from pretrain.checkpoint.format import find_resume_checkpoint, read_marker, share_of, step_tag
from pretrain.checkpoint.safe_load import check_pickle_is_safe, safe_load, write_failure


@pytest.mark.parametrize("text,expected", [("{}", "COMPLETE.json is damaged"), ("[]", "COMPLETE.json is damaged"),
                                           ("not json", "COMPLETE.json is damaged"),
                                           ('{"step": 3, "files": {"a": {"size": 5}}}', "COMPLETE.json is damaged"),
                                           ('{"step": 3, "files": {"a": 5}}', "older version")])
def test_a_damaged_or_old_marker_is_named(tmp_path, text, expected):
    (tmp_path / "COMPLETE.json").write_text(text)
    with pytest.raises(CheckpointError, match=expected):
        read_marker(tmp_path)


def test_auto_resume_refuses_a_directory_whose_checkpoints_are_all_unusable(tmp_path):
    """Starting fresh next to unusable checkpoints would mix two runs and let rotation delete the old ones:
    refused with one message, nothing touched. Without checkpoints, auto starts fresh."""
    assert find_resume_checkpoint(tmp_path, "auto", log=lambda *_: None) is None
    ckpts = tmp_path / "checkpoints"
    for step, marker in ((4, "{}"), (8, '{"step": 8, "files": {"a": 5}}')):      # damaged, older version
        (ckpts / step_tag(step)).mkdir(parents=True)
        (ckpts / step_tag(step) / "COMPLETE.json").write_text(marker)
    before = sorted((p.relative_to(tmp_path), p.read_bytes()) for p in tmp_path.rglob("*") if p.is_file())
    warnings = []
    with pytest.raises(CheckpointError, match=r"none of the 2 checkpoints .* can be resumed \(newest: "
                                              + step_tag(8) + r"\).*run\.overwrite=true"):
        find_resume_checkpoint(tmp_path, "auto", log=warnings.append)
    assert len(warnings) == 2 and all(w.startswith("warning: skipping checkpoint") for w in warnings)
    assert sorted((p.relative_to(tmp_path), p.read_bytes()) for p in tmp_path.rglob("*") if p.is_file()) == before


def test_hash_work_is_split_evenly_and_completely():
    sizes = [100, 90, 10, 10, 10, 50, 40, 1]
    paths = [Path(f"f{i}") for i in range(len(sizes))]
    shares = [share_of(paths, sizes, r, 3) for r in range(3)]
    assert sorted(i for s in shares for i in s) == list(range(len(sizes)))      # every file exactly once
    loads = [sum(sizes[i] for i in s) for s in shares]
    assert max(loads) - min(loads) <= max(sizes)


def test_write_failures_name_the_path_and_the_cause(tmp_path):
    denied = PermissionError(13, "Permission denied", str(tmp_path / "x.pt"))
    assert write_failure(tmp_path / "x.pt", denied) == f"{tmp_path / 'x.pt'}: Permission denied"
    full = OSError(28, "No space left on device", str(tmp_path / "y.pt"))
    assert write_failure(tmp_path / "y.pt", full).endswith("No space left on device")
    # torch.save's C++ writer gives no errno: the message is its first line, never a stack
    text = write_failure(tmp_path / "z.pt", RuntimeError("PytorchStreamWriter failed writing file\n  frame #0"))
    assert text == f"{tmp_path / 'z.pt'}: PytorchStreamWriter failed writing file"


def test_a_planted_pickle_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "ran"
    planted = tmp_path / "trainer_state_rank_00000.pt"
    torch.save({"step": 3, "rng": PicklePayload(marker)}, planted)
    with pytest.raises(CheckpointError, match="could run code"):
        check_pickle_is_safe(planted)
    with pytest.raises(CheckpointError, match="could run code"):
        safe_load(planted)
    assert not marker.exists()
    good = tmp_path / "good.pt"
    torch.save({"step": 3, "memory": [None, {"x": torch.ones(2)}], "rng": {"python": (3, (1, 2), None)}}, good)
    check_pickle_is_safe(good)
    assert safe_load(good)["memory"][1]["x"].sum() == 2
    (tmp_path / "garbage.pt").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="not a readable torch file"):
        check_pickle_is_safe(tmp_path / "garbage.pt")


def test_streaming_safetensors_reads_back_with_the_library(tmp_path):
    from safetensors.torch import load_file

    from pretrain.checkpoint.export import write_streaming_safetensors
    tensors = {"b": torch.randn(3, 5), "a": torch.randn(7), "c": torch.randn(2, 2, 2)}
    for dtype, torch_dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        path = tmp_path / f"{dtype}.safetensors"
        write_streaming_safetensors(path, list(tensors), {k: list(v.shape) for k, v in tensors.items()}, dtype,
                                    tensors.__getitem__, {"dtype": dtype})
        back = load_file(str(path))
        assert all(torch.equal(back[k], v.to(torch_dtype)) for k, v in tensors.items())
        header = json.loads(path.read_bytes()[8:8 + int.from_bytes(path.read_bytes()[:8], "little")])
        assert header["__metadata__"] == {"dtype": dtype}


def _fake_checkpoint(root: Path, step: int, complete: bool) -> Path:
    ckpt = root / "checkpoints" / step_tag(step)
    ckpt.mkdir(parents=True)
    (ckpt / "shard.pt").write_bytes(b"x")
    if complete:
        (ckpt / "COMPLETE.json").write_text("{}")
    return ckpt


def test_rotation_keeps_the_newest_and_removes_interrupted_saves_older_than_them(tmp_path):
    """One rotation function (saves and the divergence guard's confirmation use it): the ``keep`` newest
    complete checkpoints stay; older complete ones and interrupted saves (no marker) older than the newest
    complete one go; a newer interrupted save (perhaps the one in progress) and the quarantine stay."""
    from pretrain.checkpoint import quarantine_checkpoints, rotate_checkpoints
    layout = {1: True, 2: False, 3: True, 4: True, 5: False, 6: True, 7: False}
    paths = {s: _fake_checkpoint(tmp_path, s, complete) for s, complete in layout.items()}
    removed = rotate_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in removed) == [step_tag(s) for s in (1, 2, 3, 5)]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [step_tag(s) for s in (4, 6, 7)]
    moved = quarantine_checkpoints(tmp_path, 6)
    assert [p.name for p in moved] == [step_tag(6), step_tag(7)] and not paths[6].exists()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["diverged", step_tag(4)]
    assert rotate_checkpoints(tmp_path, keep=1) == [] and (tmp_path / "checkpoints" / "diverged").is_dir()


def test_an_edited_manifest_is_a_damaged_one(tmp_path):
    """COMPLETE.json carries the sha256 of its own content: any edit (model, layout, file list) or a missing
    self-hash is refused like a corrupted checkpoint."""
    from pretrain.checkpoint.format import SELF_HASH, sealed
    marker = sealed({"step": 3, "model": {"d_inner": 32}, "layout": {"tensor": 1},
                     "files": {"a": {"size": 1, "sha256": "0" * 64}}})
    (tmp_path / "COMPLETE.json").write_text(json.dumps(marker, indent=1))       # formatting is no edit
    assert read_marker(tmp_path)["model"] == {"d_inner": 32}
    for key, value in (("model", {"d_inner": 64}), ("layout", {"tensor": 2}), (SELF_HASH, "f" * 64)):
        (tmp_path / "COMPLETE.json").write_text(json.dumps({**marker, key: value}))
        with pytest.raises(CheckpointError, match="COMPLETE.json was edited or damaged"):
            read_marker(tmp_path)
    unsealed = {k: v for k, v in marker.items() if k != SELF_HASH}
    (tmp_path / "COMPLETE.json").write_text(json.dumps(unsealed))
    with pytest.raises(CheckpointError, match="none recorded"):
        read_marker(tmp_path)
    (tmp_path / "COMPLETE.json").write_text(json.dumps({"format": 2, **unsealed}))   # before the self-hash
    with pytest.raises(CheckpointError, match="older version"):
        read_marker(tmp_path)


def test_data_identity_names_what_changed(corpus, tmp_path):
    """A token file is identified by its content (sha256), tokenizer and size, not by its path; a change is
    described per split and source."""
    import shutil

    from pretrain.config import load_config
    from pretrain.data.identity import changed_sources, data_identity, describe
    for suffix in (".bin", ".idx", ".meta.json"):
        shutil.copy(corpus / f"train{suffix}", tmp_path / f"moved{suffix}")
    saved = data_identity(load_config(None, [f"data.train={corpus / 'train'}"]).data)
    assert set(saved["train"]) == {"train"} and saved["valid"] == {}
    moved = data_identity(load_config(None, [f"data.train={tmp_path / 'moved'}"]).data)
    assert changed_sources(saved, moved) == {}                              # the same data elsewhere
    meta = json.loads((tmp_path / "moved.meta.json").read_text())
    meta["bin_sha256"] = "ab" * 32                                          # same size, other content
    (tmp_path / "moved.meta.json").write_text(json.dumps(meta))
    other = data_identity(load_config(None, [f"data.train={tmp_path / 'moved'}",
                                             f"data.valid={corpus / 'train'}"]).data)
    text = describe(changed_sources(saved, other))
    assert "data.train: moved" in text and "sha256" in text and "tokens" not in text
    assert "data.valid: train" in text and "is new" in text
    # a mixture: one entry per named source, its weight part of the identity
    def mixture(weight):
        return data_identity(load_config(None, [f"data.train=[{{name: a, path: {corpus / 'train'}, weight: {weight}}}, "
                                                f"{{name: b, path: {tmp_path / 'moved'}, weight: 1}}]"]).data)
    assert set(mixture(1)["train"]) == {"a", "b"} and changed_sources(mixture(1), mixture(1)) == {}
    assert describe(changed_sources(mixture(1), mixture(2))) == "data.train: a (" + str(corpus / "train") + \
        "): weight 1.0 -> 2.0"
