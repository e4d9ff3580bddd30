"""Import of a state dict saved by the paper's official release (docs/method.md §8) into our layout.

Only weights are mapped; the release is time-major and packs K/V (LaMemo) or Q/K/V (Transformer-XL) into one
projection, which we split so that tensor-parallel column splits give each rank whole heads.
"""
from __future__ import annotations

import pickle
import re
from dataclasses import dataclass

import torch
from torch import nn

from .config import LaMemoConfig
from .model import LaMemoModel
from .model_files import CheckpointMismatchError

_LAYER_KEY = re.compile(r"^layers\.(\d+)\.(.+)$")
# release name (inside a layer) -> our name; the packed projections are handled separately.
_LAYER_MAP = {
    "dec_attn.q_net.weight": "attn.q_proj.weight",
    "dec_attn.r_net.weight": "attn.r_proj.weight",
    "dec_attn.o_net.weight": "attn.o_proj.weight",
    "dec_attn.layer_norm.weight": "attn.norm.weight",
    "dec_attn.layer_norm.bias": "attn.norm.bias",
    "pos_ff.CoreNet.0.weight": "ff.fc1.weight",
    "pos_ff.CoreNet.0.bias": "ff.fc1.bias",
    "pos_ff.CoreNet.3.weight": "ff.fc2.weight",
    "pos_ff.CoreNet.3.bias": "ff.fc2.bias",
    "pos_ff.layer_norm.weight": "ff.norm.weight",
    "pos_ff.layer_norm.bias": "ff.norm.bias",
}
_LAYER_IGNORED = {"dec_attn.train_logits_constant", "dec_attn.eval_logits_constant"}
_GLOBAL_MAP = {
    "r_w_bias": "content_bias",
    "r_r_bias": "position_bias",
    "r_r_bias_future": "future_position_bias",
    "r_w_bias_future": "future_content_bias",
    "word_emb.emb_layers.0.weight": "embedding.weight",
    "crit.out_layers.0.bias": "output_bias",
}
_GLOBAL_CHECKED = {"crit.out_layers.0.weight", "pos_emb.inv_freq"}


class OfficialImportError(ValueError):
    """An official checkpoint that cannot be imported (named tensor and reason in the message)."""


@dataclass
class InferredShape:
    vocab_size: int
    n_layer: int
    d_model: int
    n_head: int
    d_head: int
    d_inner: int
    variant: int


def _require(state: dict, key: str) -> torch.Tensor:
    if key not in state:
        raise OfficialImportError(f"official checkpoint is missing tensor '{key}'")
    return state[key]


def infer_shape(state: dict[str, torch.Tensor], variant: int | None = None) -> InferredShape:
    """Read the architecture off the tensors. Variants 3 and 33 have identical tensors: 3 unless told."""
    emb = _require(state, "word_emb.emb_layers.0.weight")
    bias_u = _require(state, "r_w_bias")
    layer_ids = sorted({int(m.group(1)) for k in state if (m := _LAYER_KEY.match(k))})
    if not layer_ids:
        raise OfficialImportError("official checkpoint has no 'layers.{i}.*' tensors")
    if layer_ids != list(range(len(layer_ids))):
        raise OfficialImportError(f"official checkpoint has non-contiguous layer indices {layer_ids}")
    if "layers.0.dec_attn.qkv_net.weight" in state:
        found = 0
    elif "r_w_bias_future" in state:
        found = 32
    elif "r_r_bias_future" in state:
        found = 3
    else:
        found = 31
    if variant is not None and variant != found and not (found == 3 and variant == 33):
        raise OfficialImportError(f"the tensors describe variant {found}, but variant {variant} was requested")
    if bias_u.dim() != 2:
        raise OfficialImportError(f"tensor 'r_w_bias' should be [n_head, d_head], got {tuple(bias_u.shape)}")
    return InferredShape(
        vocab_size=emb.shape[0], n_layer=len(layer_ids), d_model=emb.shape[1], n_head=bias_u.shape[0],
        d_head=bias_u.shape[1], d_inner=_require(state, "layers.0.pos_ff.CoreNet.0.weight").shape[0],
        variant=variant if variant is not None else found)


def expected_release_keys(shape: InferredShape) -> set[str]:
    """Every tensor the release saves for this architecture (the two unused buffers per layer excluded)."""
    keys = {"r_w_bias", "r_r_bias", "word_emb.emb_layers.0.weight", "crit.out_layers.0.weight",
            "crit.out_layers.0.bias"}
    if shape.variant in (3, 32, 33):
        keys.add("r_r_bias_future")
    if shape.variant == 32:
        keys.add("r_w_bias_future")
    packed = ["dec_attn.qkv_net.weight"] if shape.variant == 0 else ["dec_attn.q_net.weight", "dec_attn.kv_net.weight"]
    for i in range(shape.n_layer):
        for name in [*packed, *(n for n in _LAYER_MAP if n != "dec_attn.q_net.weight")]:
            keys.add(f"layers.{i}.{name}")
    return keys


def convert_state_dict(state: dict[str, torch.Tensor], shape: InferredShape,
                       expected_shapes: dict[str, torch.Size] | None = None) -> dict[str, torch.Tensor]:
    """Map release names to ours; every source tensor must be used or explicitly ignored, and (when
    ``expected_shapes`` is given) every mapped tensor must have our model's shape. Errors name the
    release's tensor."""
    missing = sorted(expected_release_keys(shape) - set(state))
    if missing:
        raise OfficialImportError("official checkpoint is missing tensor(s): " + ", ".join(missing))
    inner = shape.n_head * shape.d_head
    out: dict[str, torch.Tensor] = {}
    source: dict[str, str] = {}
    for key, tensor in state.items():
        if key in _GLOBAL_MAP:
            out[_GLOBAL_MAP[key]] = tensor
            source[_GLOBAL_MAP[key]] = key
            continue
        if key in _GLOBAL_CHECKED:
            continue
        match = _LAYER_KEY.match(key)
        if not match:
            raise OfficialImportError(f"official checkpoint has an unexpected tensor '{key}'")
        i, name = match.group(1), match.group(2)
        if name in _LAYER_IGNORED:
            continue
        if name in _LAYER_MAP:
            out[f"layers.{i}.{_LAYER_MAP[name]}"] = tensor
            source[f"layers.{i}.{_LAYER_MAP[name]}"] = key
        elif name == "dec_attn.kv_net.weight" and shape.variant != 0:
            if tensor.shape[0] != 2 * inner:
                raise OfficialImportError(f"tensor '{key}' has shape {tuple(tensor.shape)}, expected [{2 * inner}, d]")
            out[f"layers.{i}.attn.k_proj.weight"], out[f"layers.{i}.attn.v_proj.weight"] = tensor.chunk(2, 0)
            source[f"layers.{i}.attn.k_proj.weight"] = source[f"layers.{i}.attn.v_proj.weight"] = key
        elif name == "dec_attn.qkv_net.weight" and shape.variant == 0:
            if tensor.shape[0] != 3 * inner:
                raise OfficialImportError(f"tensor '{key}' has shape {tuple(tensor.shape)}, expected [{3 * inner}, d]")
            q, k, v = tensor.chunk(3, 0)
            out[f"layers.{i}.attn.q_proj.weight"] = q
            out[f"layers.{i}.attn.k_proj.weight"] = k
            out[f"layers.{i}.attn.v_proj.weight"] = v
            for part in ("q", "k", "v"):
                source[f"layers.{i}.attn.{part}_proj.weight"] = key
        else:
            raise OfficialImportError(f"official checkpoint has an unexpected tensor '{key}'")
    tied = _require(state, "crit.out_layers.0.weight")
    if tied.shape != state["word_emb.emb_layers.0.weight"].shape or not torch.equal(
            tied, state["word_emb.emb_layers.0.weight"]):
        raise OfficialImportError("tensor 'crit.out_layers.0.weight' is not tied to 'word_emb.emb_layers.0.weight'; "
                           "only tied output layers are supported")
    for ours, expected in (expected_shapes or {}).items():
        if ours in out and out[ours].shape != expected:
            raise OfficialImportError(f"tensor '{source[ours]}' has shape {tuple(state[source[ours]].shape)}, which does "
                               f"not fit the inferred model (needs {tuple(expected)} for {ours})")
    return {k: v.detach().clone().float().contiguous() for k, v in out.items()}


def _module_stub(module: str, name: str) -> type:
    """A stand-in for a class of the release's code (not importable here): an empty nn.Module subclass
    that restores the pickled attributes, so ``state_dict()`` works on a whole pickled model."""
    return type(name, (nn.Module,), {"__module__": f"official_stub.{module}", "forward": None})


class _StubUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            return _module_stub(module, name)


class _StubPickleModule:
    Unpickler = _StubUnpickler
    load = pickle.load

    @staticmethod
    def loads(*args, **kwargs):
        return pickle.loads(*args, **kwargs)


def read_official_state_dict(path, *, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Load a state dict (or a dict wrapping one, or, with ``trust_pickle``, a whole pickled model)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise OfficialImportError(f"no such file: {path}") from None
    except Exception as err:  # noqa: BLE001 - any unpickling failure
        if not trust_pickle:
            raise OfficialImportError(f"{path} is not a plain state dict ({type(err).__name__}); if it is a whole "
                               f"model pickled by the release and you trust the file, pass --trust-pickle") from None
        obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_StubPickleModule)
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, dict):
        for wrapper in ("model_state_dict", "state_dict", "model"):
            if wrapper in obj and isinstance(obj[wrapper], (dict, nn.Module)):
                inner = obj[wrapper]
                obj = inner.state_dict() if isinstance(inner, nn.Module) else inner
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise OfficialImportError(f"{path} does not hold a state dict of tensors")
    # DataParallel / DDP prefixes
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


def import_official(state: dict[str, torch.Tensor], *, variant: int | None = None, pre_lnorm: bool = False,
                    clamp_len: int = -1, tgt_len: int = 128, mem_len: int | None = None,
                    dropout: float = 0.0, dropatt: float = 0.0) -> LaMemoModel:
    """Build our model from a release state dict; raises with the tensor's name on any mismatch."""
    shape = infer_shape(state, variant)
    config = LaMemoConfig(vocab_size=shape.vocab_size, n_layer=shape.n_layer, d_model=shape.d_model,
                          n_head=shape.n_head, d_head=shape.d_head, d_inner=shape.d_inner, variant=shape.variant,
                          pre_lnorm=pre_lnorm, clamp_len=clamp_len, tgt_len=tgt_len, mem_len=mem_len,
                          dropout=dropout, dropatt=dropatt, extra={"imported_from": "thu-coai/LaMemo release"})
    inv_freq = state.get("pos_emb.inv_freq")
    model = LaMemoModel(config)
    if inv_freq is not None and (inv_freq.shape != model.inv_freq.shape
                                 or not torch.allclose(inv_freq.float(), model.inv_freq, rtol=1e-6)):
        raise OfficialImportError(f"tensor 'pos_emb.inv_freq' does not match the sinusoid of d_model={shape.d_model}")
    try:
        expected = {k: v.shape for k, v in model.state_dict().items()}
        model.load_weights(convert_state_dict(state, shape, expected))
    except CheckpointMismatchError as err:
        raise OfficialImportError(f"official checkpoint does not fit the inferred model: {err}") from None
    return model.eval()


def to_official_state_dict(model: LaMemoModel) -> dict[str, torch.Tensor]:
    """The inverse mapping: our weights in the release's layout (for round-trip checks and comparisons)."""
    ours = {k: v.detach().clone() for k, v in model.state_dict().items()}
    variant = model.config.variant
    inverse_global = {v: k for k, v in _GLOBAL_MAP.items()}
    inverse_layer = {v: k for k, v in _LAYER_MAP.items()}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in ours.items():
        if key in inverse_global:
            out[inverse_global[key]] = tensor
            continue
        match = _LAYER_KEY.match(key)
        if not match:
            raise KeyError(f"no release name for '{key}'")
        i, name = match.group(1), match.group(2)
        if name in ("attn.k_proj.weight", "attn.v_proj.weight") or (variant == 0 and name == "attn.q_proj.weight"):
            continue
        out[f"layers.{i}.{inverse_layer[name]}"] = tensor
    for i in range(model.config.n_layer):
        q, k, v = (ours[f"layers.{i}.attn.{p}_proj.weight"] for p in "qkv")
        if variant == 0:
            out[f"layers.{i}.dec_attn.qkv_net.weight"] = torch.cat([q, k, v])
        else:
            out[f"layers.{i}.dec_attn.kv_net.weight"] = torch.cat([k, v])
            out[f"layers.{i}.dec_attn.train_logits_constant"] = torch.zeros(1, 1, 1, 1)
            out[f"layers.{i}.dec_attn.eval_logits_constant"] = torch.zeros(1, 1, 1, 1)
    out["crit.out_layers.0.weight"] = out["word_emb.emb_layers.0.weight"]
    out["pos_emb.inv_freq"] = model.inv_freq.detach().clone()
    return out
