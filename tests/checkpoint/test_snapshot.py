"""The asynchronous save's host copy (pretrain/checkpoint/snapshot.py): what the writer process saves from it is
byte for byte what torch.save writes from the live state, and later changes to the live state do not reach it."""
from __future__ import annotations

import hashlib
import io
from collections import OrderedDict

import torch

from pretrain.checkpoint.snapshot import HostCopy, save_file, to_host


def _saved(state) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def _clone_like_deepspeed(obj):
    """What DeepSpeed's clone_tensors_for_torch_save does to a model file before it is written."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return type(obj)({k: _clone_like_deepspeed(v) for k, v in obj.items()})
    if isinstance(obj, (list, tuple)):
        return type(obj)(_clone_like_deepspeed(v) for v in obj)
    return obj


def _state():
    flat = torch.randn(100)
    weights = OrderedDict(w=torch.nn.Parameter(torch.randn(4, 6)), b=torch.arange(5, dtype=torch.int64),
                          half=torch.randn(3, 3).to(torch.bfloat16), empty=torch.zeros(0), other_empty=torch.ones(0, 2),
                          empty_of_another_type=torch.zeros(0, dtype=torch.bfloat16))
    weights._metadata = {"": {"version": 1}}
    return {"flat": flat, "views": [flat[:10], flat[10:40].view(5, 6), flat[40:].view(6, 10).t()],
            "weights": weights, "step": 7, "name": "x", "nested": ({"m": torch.randn(2, 8)[:, ::2]}, None, 1.5)}


def test_the_host_copy_saves_the_same_bytes_and_is_not_a_view(tmp_path):
    torch.manual_seed(0)
    state = _state()
    expected = _saved(state)
    (tmp_path / "live").mkdir(), (tmp_path / "copy").mkdir()
    torch.save(state, tmp_path / "live" / "file.pt")      # a file's records are named after it: same name
    copied = to_host(state)
    assert isinstance(copied, HostCopy) and copied.block.is_shared()
    state["flat"].add_(1.0)                    # the next optimizer step changes the live tensors in place
    state["weights"]["w"].data.mul_(2.0)
    assert _saved(copied.materialize()) == expected
    save_file(copied, str(tmp_path / "copy" / "file.pt"))
    assert (hashlib.sha256((tmp_path / "copy" / "file.pt").read_bytes()).hexdigest()
            == hashlib.sha256((tmp_path / "live" / "file.pt").read_bytes()).hexdigest())
    loaded = torch.load(tmp_path / "copy" / "file.pt", weights_only=False)
    assert loaded["views"][0].untyped_storage().data_ptr() == loaded["flat"].untyped_storage().data_ptr()
    assert loaded["weights"]._metadata == {"": {"version": 1}}


def test_a_compacted_copy_saves_what_deepspeeds_clone_writes():
    torch.manual_seed(1)
    state = _state()
    del state["weights"]._metadata           # clone_tensors_for_torch_save rebuilds dicts without it
    assert _saved(to_host(state, compact=True).materialize()) == _saved(_clone_like_deepspeed(state))
