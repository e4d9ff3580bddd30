"""``LaMemoForCausalLM``: the single-device ``LaMemoModel`` behind transformers' ``PreTrainedModel`` and
``GenerationMixin`` (``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``).

The recurrent memory travels the transformers way, as the ``cache`` argument and output (called
``past_key_values`` before transformers 5.2x; both names are accepted): a ``LaMemoCache`` holding the
``LaMemoMemory`` of everything fed so far. ``forward`` feeds ``input_ids`` through the model in segments of
``config.tgt_len`` tokens with a memory of ``config.mem_len`` rows (``tgt_len`` when null), exactly as our own
evaluation and generator do, so a prompt longer than one segment enters the memory segment by segment and a
long document can be scored in one call or in consecutive calls that pass ``cache`` on. ``labels`` are shifted
inside (position t predicts label t + 1; -100 is ignored), as for every transformers causal LM. ``generate``
supports greedy search and sampling on unpadded batches (no beam search: a memory cannot be re-ordered by beam).

The weights are the ones of ``LaMemoModel`` under the prefix ``model.``; ``config.json`` and
``model.safetensors`` are the same files ``LaMemoModel.from_pretrained`` reads, and ``save_pretrained`` writes
them without the prefix, so one directory serves both loaders.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_lamemo import LaMemoConfig
from .memory import LaMemoMemory
from .model import LaMemoModel
from .positions import inverse_frequencies


class LaMemoCache:
    """The recurrent state between calls: the model's memory and how many tokens it has seen (generation
    feeds only the tokens the memory has not seen yet)."""

    def __init__(self, memory: LaMemoMemory | None = None, seen_tokens: int = 0):
        self.memory = memory
        self.seen_tokens = seen_tokens

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens


class LaMemoForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = LaMemoConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["DecoderLayer"]

    def __init__(self, config: LaMemoConfig):
        super().__init__(config)
        # initialize=False: zeros here; the weights are loaded, or ``_init_weights`` draws them (init.py).
        self.model = LaMemoModel(config.model_config(), initialize=False)
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False          # the memory is not a key/value cache: the model makes its own (LaMemoCache)

    def _init_weights(self, module):
        # transformers 5 builds the model on the meta device and loads the saved tensors; the sinusoid
        # frequencies are not saved (a non-persistent buffer), so they are rebuilt here, where transformers
        # initialises what the file did not hold. A model built from a config draws its weights the way
        # LaMemoModel does (one seed per tensor, init.py), not with transformers' generic rules.
        if isinstance(module, LaMemoModel):
            module.inv_freq = inverse_frequencies(module.config.d_model).to(module.inv_freq.device)
            if not all(getattr(p, "_is_hf_initialized", False) for p in module.parameters()):
                module.reset_parameters()

    def get_input_embeddings(self):
        return self.model.embedding

    def set_input_embeddings(self, value):
        self.model.embedding = value

    @property
    def mem_len(self) -> int:
        """The memory length every call uses: ``config.mem_len``, or ``config.tgt_len`` when that is null."""
        return self.config.mem_len if self.config.mem_len is not None else self.config.tgt_len

    def forward(self, input_ids: torch.LongTensor, labels: torch.LongTensor | None = None,
                cache: LaMemoCache | None = None, past_key_values: LaMemoCache | None = None,
                attention_mask: torch.Tensor | None = None, use_cache: bool | None = None,
                logits_to_keep: int = 0, return_dict: bool | None = None, **kwargs) -> CausalLMOutputWithPast:
        """``input_ids`` [B, L] after the memory in ``cache`` (None: empty). Returns the logits of every position
        (the last ``logits_to_keep`` when > 0), the mean loss over the shifted ``labels`` when given, and the
        cache after these tokens."""
        cache = cache if cache is not None else past_key_values
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("LaMemoForCausalLM does not take padded batches (the memory has no mask): "
                             "give prompts of one length")
        memory = cache.memory if cache is not None else None
        seen = cache.seen_tokens if cache is not None else 0
        length = input_ids.shape[1]
        first_kept = length - logits_to_keep if logits_to_keep > 0 else 0
        logits = []
        for start in range(0, length, self.config.tgt_len):
            end = min(start + self.config.tgt_len, length)
            if end <= first_kept:
                out = self.model(input_ids[:, start:end], memory=memory, mem_len=self.mem_len,
                                 last_logits_only=True)
            else:
                out = self.model(input_ids[:, start:end], memory=memory, mem_len=self.mem_len)
                logits.append(out.logits[:, max(first_kept - start, 0):])
            memory = out.memory
        logits = torch.cat(logits, dim=1)
        loss = None
        if labels is not None:
            if logits.shape[1] != length:
                raise ValueError("labels need the logits of every position (logits_to_keep=0)")
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().to(logits.device),
                                   ignore_index=-100)
        new_cache = LaMemoCache(memory, seen + length) if use_cache is not False else None
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=new_cache)

    def prepare_inputs_for_generation(self, input_ids, cache=None, past_key_values=None, attention_mask=None,
                                      **kwargs):
        """The first step feeds the whole prompt (segment by segment, inside ``forward``); later steps feed
        only the tokens the memory has not seen (the last one)."""
        cache = cache if cache is not None else past_key_values
        if cache is not None:
            input_ids = input_ids[:, cache.seen_tokens:]
        return {"input_ids": input_ids, "cache": cache, "attention_mask": None, "use_cache": True,
                "logits_to_keep": 1}

    def save_pretrained(self, save_directory, **kwargs):
        """transformers' save with the state dict of ``LaMemoModel`` (no ``model.`` prefix): the directory
        keeps loading with ``LaMemoModel.from_pretrained`` too."""
        kwargs.setdefault("state_dict", self.model.state_dict())
        return super().save_pretrained(save_directory, **kwargs)
