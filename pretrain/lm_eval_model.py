"""LaMemo in lm-evaluation-harness: the ``lamemo`` model type (``--model lamemo --model_args pretrained=EXPORT``).

A segment-recurrent model reads a document of any length by carrying its memory; lm-eval's stock ``hf``
backend instead cuts long documents into independent windows of ``max_length`` tokens. This class keeps the
memory:

* ``loglikelihood_rolling`` scores a whole document in segments of ``tgt_len`` tokens with a memory of
  ``mem_len`` (the model's defaults, or ``tgt_len=`` / ``mem_len=`` in ``--model_args``), every token once,
  the first one after the ``<eos>`` that ends the document before it. The document is tokenised as
  preprocessing does (``encode_document``: ending in ``<eos>``), so the total equals ``lamemo-evaluate --text``
  on the same text (one evaluation routine, ``lamemo_parallel.inference.evaluate_streams``).
* ``loglikelihood`` feeds the context through the memory and scores the continuation after it (the context and
  continuation are tokenised together and split where the context's own ids end, as the ``hf`` backend does;
  an empty context is the ``<eos>`` of a document start).
* ``generate_until`` feeds the context segment by segment (``lamemo_parallel.generation.generate``) and
  decodes greedily, or samples when ``do_sample`` / ``temperature`` say so, until a stop string or ``<eos>``.

One request at a time on one device: the memory is per document. Requires the ``[eval]`` extra.
"""
from __future__ import annotations

from pathlib import Path

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from lamemo_parallel import LaMemoModel
from lamemo_parallel.generation import generate
from lamemo_parallel.inference import evaluate_streams
from pretrain.data.tokenizer import check_vocab_matches, load_tokenizer

MODEL_NAME = "lamemo"


@register_model(MODEL_NAME)
class LaMemoLM(LM):
    def __init__(self, pretrained: str, tokenizer: str | None = None, device: str | None = None,
                 tgt_len: int | None = None, mem_len: int | None = None, max_gen_toks: int = 256, **_ignored):
        """``pretrained``: an export (``lamemo-export``) or any ``save_pretrained`` directory with a
        ``tokenizer/``; lm-eval's own arguments (batch_size, ...) are accepted and ignored."""
        super().__init__()
        # lm-eval passes its --device (default "cuda"); on a machine without CUDA the model runs on the CPU, as the
        # stock hf backend does.
        if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self._device = torch.device(device)
        self.model = LaMemoModel.from_pretrained(pretrained, device=self._device)
        self.tokenizer = load_tokenizer(Path(tokenizer or Path(pretrained) / "tokenizer"))
        check_vocab_matches(self.tokenizer, self.model.config.vocab_size)
        config = self.model.config
        self.tgt_len = int(tgt_len or config.tgt_len)
        self.mem_len = int(mem_len if mem_len is not None else (config.mem_len if config.mem_len is not None
                                                                 else self.tgt_len))
        self.max_gen_toks = int(max_gen_toks)

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def tokenizer_name(self) -> str:
        return f"lamemo-{self.tokenizer.kind}-{self.tokenizer.fingerprint()[:16]}"

    def _encode(self, text: str) -> list[int]:
        """Ids of a piece of text that may end mid-line: the word tokenizer's ``<eos>`` after an unfinished last
        line is dropped (it marks the end of a line the text has not ended)."""
        ids = self.tokenizer.encode(text)
        if self.tokenizer.kind == "word" and ids and not text.endswith("\n"):
            ids.pop()
        return ids

    def _scores(self, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(NLL, whether the greedy choice was the target) of ids[1:], each predicted from the ids before it."""
        tokens = torch.tensor([ids], device=self._device)
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        memory, nll, greedy = None, [], []
        with torch.no_grad():
            for start in range(0, inputs.shape[1], self.tgt_len):
                end = start + self.tgt_len
                out = self.model(inputs[:, start:end], targets=targets[:, start:end], memory=memory,
                                 mem_len=self.mem_len, return_logits=True)
                memory = out.memory
                nll.append(out.nll[0].double())
                greedy.append(out.logits[0].argmax(-1) == targets[0, start:end])
        return torch.cat(nll), torch.cat(greedy)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        results = []
        for request in tqdm(requests, disable=disable_tqdm, desc="loglikelihood"):
            context, continuation = request.args
            whole = self._encode(context + continuation)
            n_context = len(self._encode(context))
            if n_context == len(whole):                      # the continuation merged into the context's ids
                n_context -= 1
            prefix = [] if n_context else [self.eot_token_id]
            nll, greedy = self._scores(prefix + whole)
            n_cont = len(whole) - n_context
            result = (-float(nll[-n_cont:].sum()), bool(greedy[-n_cont:].all()))
            results.append(result)
            self.cache_hook.add_partial("loglikelihood", (context, continuation), result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        results = []
        for request in tqdm(requests, disable=disable_tqdm, desc="loglikelihood_rolling"):
            (text,) = request.args
            ids = [self.eot_token_id] + self.tokenizer.encode_document(text)
            streams = torch.tensor([ids], device=self._device)
            score = -evaluate_streams(self.model, streams, tgt_len=self.tgt_len, mem_len=self.mem_len).nll_sum
            results.append(score)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), score)
        return results

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        results = []
        for request in tqdm(requests, disable=disable_tqdm, desc="generate_until"):
            context, gen_kwargs = request.args
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.pop("max_gen_toks", self.max_gen_toks))
            temperature = float(gen_kwargs.pop("temperature", 0.0)) if gen_kwargs.pop("do_sample", False) else 0.0
            prompt = self._encode(context) or [self.eot_token_id]
            new = generate(self.model, torch.tensor([prompt], device=self._device), max_new_tokens=max_new,
                           segment_len=self.tgt_len, mem_len=self.mem_len, temperature=temperature,
                           top_k=int(gen_kwargs.pop("top_k", 0) or 0), top_p=float(gen_kwargs.pop("top_p", 1.0)),
                           seed=gen_kwargs.pop("seed", 0), stop_token=self.eot_token_id)[0].tolist()
            if self.eot_token_id in new and self.tokenizer.kind != "word":
                new = new[:new.index(self.eot_token_id)]
            text = self.tokenizer.decode(new)
            for stop in until:
                text = text.split(stop)[0] if stop else text
            results.append(text)
            self.cache_hook.add_partial("generate_until", request.args, text)
        return results
