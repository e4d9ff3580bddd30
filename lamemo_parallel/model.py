"""The LaMemo language model on one device (plain torch), readable in one sitting.

    model = LaMemoModel.from_pretrained(path)
    out = model(tokens, targets=targets, memory=memory)   # tokens, targets: LongTensor [batch, time]
    out.nll       # [batch, time] negative log-likelihood in nats
    out.memory    # LaMemoMemory to pass to the next segment (memory=None starts empty)
"""
from __future__ import annotations

import math
from typing import NamedTuple
from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import GlobalBiases, PositionEncodings, statistics_dtype, use_attention_backend
from .config import LaMemoConfig, resolve_mem_len
from .init import draw_init_seed, initialise_parameters
from .layer import DecoderLayer
from .linear import PlainParts
from .memory import LaMemoMemory, advance_valid, newest_rows
from .model_files import check_state_dict, load_model_dir, save_model_dir
from .positions import inverse_frequencies, position_encodings
from .sharding import sharding_table

class LaMemoOutput(NamedTuple):
    """What a forward call returns (a named tuple so that ZeRO-3's backward hooks see the tensors)."""

    nll: torch.Tensor | None            # [B, N] in nats (None when no targets were given)
    memory: LaMemoMemory                # the state for the next segment (detached)
    logits: torch.Tensor | None = None  # [B, N, V] when asked for (or when no targets were given)
    hidden: torch.Tensor | None = None  # [B, N, d] final hidden states of the current rows, when asked for
    attentions: list | None = None      # per layer: {"causal": [B,H,N,T], "lookahead": [B,H,M,W], ...}


class LaMemoModel(nn.Module):
    """``LaMemoModel(config)`` draws its initial weights from ``init_seed`` (one seed per tensor, see
    ``init.py``); without one, the seed is one draw from torch's default generator, so
    ``torch.manual_seed(s); LaMemoModel(config)`` is reproducible and equals every parallel layout's
    initialisation at the same seed. ``initialize=False`` leaves zeros (a state dict is loaded next)."""

    def __init__(self, config: LaMemoConfig, parallel: PlainParts | None = None, *, init_seed: int | None = None,
                 initialize: bool = True):
        super().__init__()
        init_seed = draw_init_seed() if (init_seed is None and initialize) else init_seed
        self.config = config
        #: How this model's pieces are made for its parallel layout (``linear.PlainParts``: one device).
        self.parallel = parallel = parallel or PlainParts()
        #: Where every parameter lives (the single-device names, TP split dims, vocabulary padding); building
        #: it checks that the layout can split this config (``sharding.check_layout``).
        self.sharding = sharding_table(config, parallel.tp_size)
        self.n_local_heads = parallel.local(config.n_head)
        # Construction draws nothing from the default generator (torch's own layer inits run on a fork
        # and are overwritten below): only the init seed decides the weights.
        with torch.random.fork_rng(devices=[]):
            self.embedding = parallel.embedding(config.vocab_size, config.d_model)
            self.output_bias = parallel.output_bias(config.vocab_size)
            self.drop = nn.Dropout(config.dropout)
            self.content_bias = self._global_bias()
            self.position_bias = self._global_bias()
            self.future_position_bias = self._global_bias() if config.traits.future_position_bias else None
            self.future_content_bias = self._global_bias() if config.traits.future_content_bias else None
            self.layers = nn.ModuleList(DecoderLayer(config, parallel) for _ in range(config.n_layer))
        parallel.mark_split(dict(self.named_parameters()), self.sharding)
        self.register_buffer("inv_freq", inverse_frequencies(config.d_model), persistent=False)
        self.register_buffer("vocab_padding", parallel.vocab_padding(config.vocab_size), persistent=False)
        #: Recompute each layer's activations in the backward pass (training only). The cached memory enters a
        #: layer as an explicit input and the new memory leaves it as an output, so a recompute reads the
        #: memory as it was at forward time; torch's checkpoint replays the dropout RNG state.
        self.activation_checkpointing = False
        if initialize:
            self.reset_parameters(init_seed)
        else:
            with torch.no_grad():
                for param in self.parameters():
                    param.zero_()

    def _apply(self, fn, recurse=True):
        # The sinusoid frequencies stay float32 whatever the model's dtype: in bfloat16, omega and the
        # distances would be rounded to 8 bits and neighbouring distances would share one encoding.
        super()._apply(fn, recurse)
        self.inv_freq = inverse_frequencies(self.config.d_model).to(self.inv_freq.device)
        return self

    def _global_bias(self) -> nn.Parameter:
        """One of u, v, v+, u+: [H_local, d_h]."""
        return nn.Parameter(torch.zeros(self.n_local_heads, self.config.d_head))

    # ------------------------------------------------------------------ initialisation (docs/method.md §7)
    def reset_parameters(self, init_seed: int | None = None) -> None:
        """Every parameter from its own seed (``init.tensor_seed(init_seed, name)``): this rank's slice of the
        full tensor the single-device model would hold."""
        init_seed = draw_init_seed() if init_seed is None else init_seed
        initialise_parameters(dict(self.named_parameters()), self.sharding, init_seed=init_seed,
                              init_std=self.config.init_std, tp_rank=self.parallel.tp_rank,
                              tp_size=self.parallel.tp_size)

    # ------------------------------------------------------------------ attention implementation
    @property
    def attention_backend(self) -> str:
        """``eager`` (plain torch: the reference, and the CPU path) or ``flex`` (FlexAttention, for CUDA)."""
        return self.layers[0].attn.backend

    @attention_backend.setter
    def attention_backend(self, name: str) -> None:
        use_attention_backend(self, name)

    # ------------------------------------------------------------------ memory
    def empty_memory(self, batch_size: int, device=None, dtype=None) -> LaMemoMemory:
        c = self.config
        return LaMemoMemory.empty(batch_size=batch_size, n_layer=c.n_layer, d_model=c.d_model,
                                  n_head=self.n_local_heads, d_head=c.d_head, lookahead=c.traits.looks_ahead,
                                  device=device or self.embedding.weight.device,
                                  dtype=dtype or self.embedding.weight.dtype)

    def resolve_mem_len(self, mem_len: int | None, seg_len: int) -> int:
        """The memory length of a call: ``mem_len`` if given, else the config's (``config.resolve_mem_len``:
        None = the segment length, 0 = no memory)."""
        return resolve_mem_len(self.config.mem_len if mem_len is None else mem_len, seg_len)

    # ------------------------------------------------------------------ pieces
    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Scaled input embeddings [B, N, d] (before embedding dropout)."""
        return self.embedding(tokens) * math.sqrt(self.config.d_model)

    def local_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Output layer tied to the input embedding, with a bias: this rank's vocabulary rows [B, N, V_local]
        (under tensor parallelism the padding rows are -inf)."""
        return self.parallel.vocab_logits(hidden, self.embedding.weight, self.output_bias, self.vocab_padding)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of the whole vocabulary [B, N, V] (gathered over the TP group)."""
        return self.parallel.full_logits(self.local_logits(hidden), self.config.vocab_size)

    def token_nll(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.local_logits(hidden).to(statistics_dtype(hidden.dtype))   # the loss in float32 at least
        return self.parallel.token_nll(logits, targets)

    def global_biases(self) -> GlobalBiases:
        return GlobalBiases(content=self.content_bias, position=self.position_bias,
                            future_position=self.future_position_bias, future_content=self.future_content_bias)

    def position_encodings(self, mem_len: int, seg_len: int, dtype) -> PositionEncodings:
        """This step's position tables (``positions.position_encodings``), with the embedding dropout."""
        return position_encodings(self.config, mem_len, seg_len, self.inv_freq, dtype, self.drop)

    # ------------------------------------------------------------------ forward
    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None,
                memory: LaMemoMemory | None = None, *, mem_len: int | None = None,
                return_logits: bool = False, return_hidden: bool = False,
                return_attention: bool = False, last_logits_only: bool = False) -> LaMemoOutput:
        """``last_logits_only``: logits of the last position only ([B, 1, V]; what generation samples from)."""
        c = self.config
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [batch, time], got shape {tuple(tokens.shape)}")
        if targets is not None and targets.shape != tokens.shape:
            raise ValueError(f"targets shape {tuple(targets.shape)} differs from tokens {tuple(tokens.shape)}")
        B, N = tokens.shape
        mem_len = self.resolve_mem_len(mem_len, N)
        emb = self.drop(self.embed(tokens))
        if memory is None:
            memory = self.empty_memory(B, device=emb.device, dtype=emb.dtype)
        memory.check_compatible(batch_size=B, n_layer=c.n_layer, d_model=c.d_model, n_head=self.n_local_heads,
                                d_head=c.d_head, lookahead=c.traits.looks_ahead)
        M = memory.length
        positions = self.position_encodings(M, N, emb.dtype)
        biases = self.global_biases()
        attentions = [] if return_attention else None

        hidden, new_memory = self._layers(emb, memory, positions, biases, attentions, mem_len)
        hidden = self.drop(hidden)
        if mem_len > 0:
            # rows a batch row did not have stay masked, the N new ones are real (LaMemoMemory.valid)
            new_memory = new_memory.detach().compact()
            new_memory = new_memory.with_valid(advance_valid(memory.valid, N, new_memory.length))
        else:
            new_memory = self.empty_memory(B)

        nll = self.token_nll(hidden, targets) if targets is not None else None
        logits = None
        if return_logits or targets is None:
            logits = self.logits(hidden[:, -1:] if last_logits_only else hidden)
        return LaMemoOutput(nll=nll, memory=new_memory, logits=logits,
                            hidden=hidden if return_hidden else None, attentions=attentions)

    def _layers(self, emb, memory, positions, biases, attentions, mem_len):
        """The layer loop: LaMemo recomputes the memory rows at every layer from the embedding FIFO (docs/method.md
        §4); Transformer-XL's layer l attends to the cached input of layer l (§5). ``DecoderLayer.step`` says how."""
        lookahead = self.config.traits.looks_ahead
        hidden = torch.cat([memory.embeddings, emb], dim=1) if lookahead else emb
        layer_memories = []
        for i, layer in enumerate(self.layers):
            inputs = dict(positions=positions, biases=biases, mem_len=mem_len, return_probs=attentions is not None,
                          feeds_next_layer=i < len(self.layers) - 1, valid=memory.valid)
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                result = checkpoint(layer.step, hidden, memory.layer(i), use_reentrant=False, **inputs)
            else:
                result = layer.step(hidden, memory.layer(i), **inputs)
            hidden = result.hidden
            layer_memories.append(result.memory)
            if attentions is not None:
                attentions.append(result.probs)
        # The top layer returned its current rows only (its memory rows are discarded: feeds_next_layer).
        if not lookahead:
            return hidden, LaMemoMemory.from_layers(layer_memories)
        return hidden, LaMemoMemory.from_layers(layer_memories, newest_rows(memory.embeddings, emb, mem_len))

    # ------------------------------------------------------------------ layouts (identity on one device)
    def to_local_layout(self, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's slices of tensors in the single-device layout (weights, gradients, optimizer moments)."""
        return {name: self.parallel.to_local(self.sharding[name], tensor) for name, tensor in full.items()}

    def to_full_layout(self, local: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Collective over the TP group: tensors of this rank's layout gathered into the single-device layout.
        Every rank must call it with the same names in the same order. Replicated tensors are returned as
        this rank holds them."""
        return {name: self.parallel.to_full(self.sharding[name], tensor) for name, tensor in local.items()}

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Collective: the single-device state dict (``LaMemoModel.state_dict()`` layout), on every rank."""
        return self.to_full_layout({name: t.detach() for name, t in self.state_dict().items()})

    def gather_memory(self, memory: LaMemoMemory) -> LaMemoMemory:
        """Collective: C-bar / Z-bar gathered over heads (the single-device memory); the rest is replicated."""
        heads = self.parallel.gather_heads
        return LaMemoMemory(embeddings=memory.embeddings, vectors=[heads(t) for t in memory.vectors],
                            log_normalizers=[heads(t) for t in memory.log_normalizers], hidden=list(memory.hidden),
                            valid=memory.valid)

    def shard_memory(self, memory: LaMemoMemory) -> LaMemoMemory:
        """This rank's heads of a single-device memory (no communication)."""
        heads = self.parallel.shard
        return LaMemoMemory(embeddings=memory.embeddings, vectors=[heads(t, 2) for t in memory.vectors],
                            log_normalizers=[heads(t, 2) for t in memory.log_normalizers],
                            hidden=list(memory.hidden), valid=memory.valid)

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, path: str | Path) -> Path:
        """Write the model directory (``model_files``: ``config.json`` and ``model.safetensors``)."""
        return save_model_dir(path, self.config, self.state_dict())

    @classmethod
    def from_pretrained(cls, path: str | Path, *, device=None, dtype=None) -> "LaMemoModel":
        config, weights = load_model_dir(path)
        model = cls(config, initialize=False)
        model.load_weights(weights)
        model.eval()
        return model.to(device=device, dtype=dtype) if (device is not None or dtype is not None) else model

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Strict load of a single-device state dict (this rank keeps its slices; no communication), with a
        message naming every missing, unexpected or mis-shaped tensor."""
        check_state_dict(state_dict, {name: entry.shape for name, entry in self.sharding.items()})
        self.load_state_dict(self.to_local_layout(state_dict), strict=True)

    load_full_state_dict = load_weights   # the parallel models' name for 'load the single-device layout'

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
