"""The model's configuration: one typed, validated, JSON-serialisable dataclass."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

#: The release's ``attn_type`` numbers we support (docs/method.md §5).
#: 0 = Transformer-XL, 3 = LaMemo (default), 31 / 32 / 33 = ablations of the look-ahead positions.
SUPPORTED_VARIANTS = (0, 3, 31, 32, 33)


@dataclass(frozen=True)
class VariantTraits:
    """What a variant number means (docs/method.md §5): the only place that reads the numbers.

    Everything else asks these named questions, so a new ablation is one line here."""

    looks_ahead: bool
    """Memory rows are recomputed with look-ahead attention to the current rows (LaMemo); False = Transformer-XL."""
    future_position_bias: bool
    """The look-ahead position score has its own bias v+ (``r_r_bias_future``); otherwise it reuses v."""
    future_content_bias: bool
    """The look-ahead content score has its own bias u+ (``r_w_bias_future``); otherwise it reuses u."""
    full_look_ahead: bool
    """No strict-future mask: signed distances M-1..0, 1..M from a 2M table (needs M >= N once memory exists)."""
    negative_future_distances: bool
    """Future distances are written -1..-M (XL's positions extended to the future) instead of 1..M."""


_TRAITS = {
    0: VariantTraits(looks_ahead=False, future_position_bias=False, future_content_bias=False,
                     full_look_ahead=False, negative_future_distances=False),
    3: VariantTraits(looks_ahead=True, future_position_bias=True, future_content_bias=False,
                     full_look_ahead=False, negative_future_distances=False),
    31: VariantTraits(looks_ahead=True, future_position_bias=False, future_content_bias=False,
                      full_look_ahead=False, negative_future_distances=True),
    32: VariantTraits(looks_ahead=True, future_position_bias=True, future_content_bias=True,
                      full_look_ahead=False, negative_future_distances=False),
    33: VariantTraits(looks_ahead=True, future_position_bias=True, future_content_bias=False,
                      full_look_ahead=True, negative_future_distances=False),
}
assert tuple(_TRAITS) == SUPPORTED_VARIANTS
#: The default variant: LaMemo as published.
DEFAULT_VARIANT = 3
#: The Transformer-XL baseline.
BASELINE_VARIANT = 0
#: What the backward pass recomputes instead of keeping (``parallel.recompute``): ``none``; ``attention``
#: (selective: each layer's attention core, ``RelativeAttention.recompute_core``); ``full`` (whole layers).
RECOMPUTE_MODES = ("none", "attention", "full")
#: Keys that transformers reads or writes in ``config.json`` (``AutoConfig``, ``trust_remote_code``, its
#: ``save_pretrained``): one file serves both loaders, and ``LaMemoConfig`` skips these.
TRANSFORMERS_KEYS = ("model_type", "architectures", "auto_map", "transformers_version", "dtype", "torch_dtype")


def variant_traits(variant: int) -> VariantTraits:
    """The named properties of one supported variant number."""
    try:
        return _TRAITS[variant]
    except (KeyError, TypeError):
        raise ConfigError(f"variant must be one of {SUPPORTED_VARIANTS}, got {variant!r}") from None


def check_variant(variant) -> str | None:
    """The problem with a variant number (one line), or None when it is supported."""
    if variant in _TRAITS:
        return None
    return f"variant must be one of {', '.join(map(str, SUPPORTED_VARIANTS))}, got {variant!r}"


class ConfigError(ValueError):
    """A configuration that cannot describe a valid model."""


def resolve_mem_len(mem_len: int | None, seg_len: int) -> int:
    """The memory length to use: ``mem_len`` as given (0 = no memory), or the segment length when it is None
    (the paper's M = N). The one place this default is written: the model, the pipeline stages, evaluation,
    generation and the attention tool all ask it."""
    mem_len = seg_len if mem_len is None else mem_len
    if not isinstance(mem_len, int) or mem_len < 0:
        raise ConfigError(f"mem_len must be >= 0, got {mem_len!r}")
    return mem_len


@dataclass
class LaMemoConfig:
    """Architecture of a LaMemo (or Transformer-XL) language model.

    Sizes follow the paper's notation: ``d_model`` = d, ``n_head`` x ``d_head`` attention heads,
    ``d_inner`` = d_ff. ``tgt_len`` / ``mem_len`` are defaults only: every forward call may override
    them (evaluation often uses a longer memory than training).
    """

    vocab_size: int
    """Vocabulary size (rows of the embedding and the output layer)."""
    n_layer: int = 4
    """Number of LaMemo (or Transformer-XL) layers."""
    d_model: int = 256
    """d: the model width (embeddings, residual stream); even, for the sinusoidal positions."""
    n_head: int = 8
    """Attention heads per layer."""
    d_head: int | None = None
    """Width of one head; defaults to d_model // n_head."""
    d_inner: int = 1024
    """d_ff: the hidden width of each layer's feed-forward block."""
    variant: int = DEFAULT_VARIANT
    """The release's attn_type: 0 (Transformer-XL), 3 (LaMemo), 31, 32, 33 (ablations)."""
    pre_lnorm: bool = False
    """Pre-LayerNorm blocks; the release's default (and ours) is post-LN."""
    dropout: float = 0.0
    """Dropout on embeddings, residual branches and the final hidden states (training only)."""
    dropatt: float = 0.0
    """Dropout on the attention probabilities (training only)."""
    clamp_len: int = -1
    """Clamp every relative distance (future ones too) to at most this value; <= 0 disables."""
    tgt_len: int = 128
    mem_len: int | None = None
    """Default memory length; None means 'equal to the segment length of the call' (the paper's N = M)."""
    init_std: float = 0.02
    """Standard deviation of the normal initialisation of the weights."""
    layer_norm_eps: float = 1e-5
    extra: dict = field(default_factory=dict)
    """Free-form metadata (e.g. where a checkpoint came from); not used by the model."""

    def __post_init__(self) -> None:
        if self.d_head is None:
            if self.n_head <= 0 or self.d_model % self.n_head:
                raise ConfigError(f"d_model={self.d_model} is not divisible by n_head={self.n_head}; set d_head")
            self.d_head = self.d_model // self.n_head
        self.validate()

    def validate(self) -> None:
        positive = {"vocab_size": self.vocab_size, "n_layer": self.n_layer, "d_model": self.d_model,
                    "n_head": self.n_head, "d_head": self.d_head, "d_inner": self.d_inner, "tgt_len": self.tgt_len}
        for name, value in positive.items():
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        variant_traits(self.variant)
        if self.d_model % 2:
            raise ConfigError(f"d_model must be even for the sinusoidal positions, got {self.d_model}")
        if self.mem_len is not None and (not isinstance(self.mem_len, int) or self.mem_len < 0):
            raise ConfigError(f"mem_len must be a non-negative integer or null, got {self.mem_len!r}")
        for name in ("dropout", "dropatt"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {value}")

    @property
    def traits(self) -> VariantTraits:
        """What this variant means: ask ``config.traits.future_position_bias``, ``.full_look_ahead``, ..."""
        return variant_traits(self.variant)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "LaMemoConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        data = {k: v for k, v in data.items() if k not in TRANSFORMERS_KEYS}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown model config keys: {', '.join(unknown)}")
        return cls(**data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "LaMemoConfig":
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"no model config at {path}") from None
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path} is not valid JSON: {err}") from None
        return cls.from_dict(data)
