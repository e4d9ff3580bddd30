"""Text generation with memory: the prompt is fed in segments, then one token at a time (docs/method.md §7: WikiText-103
generation uses 256-token prompt segments, mem_len 512, clamp_len 400, top-p 0.95).

One-token steps change the look-ahead tiling (docs/method.md §9.7); that is inherent to the method's generation.
Only the logits sampled from are computed: the last position of each prompt segment and of each new token
(the output layer is the largest matmul of a step when the vocabulary is large)."""
from __future__ import annotations

import torch


def filter_logits(logits: torch.Tensor, *, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Mask all but the top-k tokens and/or the smallest set whose probability reaches top_p."""
    logits = logits.clone()
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits[logits < kth] = float("-inf")
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        remove = cumulative - torch.softmax(sorted_logits, dim=-1) >= top_p   # keep the token crossing top_p
        sorted_logits[remove] = float("-inf")
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


@torch.no_grad()
def generate(model, prompt: torch.Tensor, *, max_new_tokens: int, segment_len: int, mem_len: int,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
             stop_token: int | None = None) -> torch.Tensor:
    """prompt: LongTensor [B, P] (P >= 1). Returns [B, max_new_tokens] sampled continuations."""
    if prompt.dim() != 2 or prompt.shape[1] < 1:
        raise ValueError("prompt must be a [batch, length >= 1] tensor of token ids")
    if temperature < 0:
        raise ValueError("temperature must be >= 0 (0 = greedy)")
    model.eval()
    generator = torch.Generator(device=prompt.device)
    if seed is not None:
        generator.manual_seed(seed)
    memory, logits = None, None
    for start in range(0, prompt.shape[1], segment_len):
        out = model(prompt[:, start:start + segment_len], memory=memory, mem_len=mem_len, last_logits_only=True)
        memory, logits = out.memory, out.logits[:, -1]
    produced = []
    for _ in range(max_new_tokens):
        if temperature == 0:
            token = logits.argmax(-1, keepdim=True)
        else:
            probs = torch.softmax(filter_logits(logits.float() / temperature, top_k=top_k, top_p=top_p), -1)
            token = torch.multinomial(probs, 1, generator=generator)
        produced.append(token)
        if stop_token is not None and bool((token == stop_token).all()):
            break
        out = model(token, memory=memory, mem_len=mem_len, last_logits_only=True)
        memory, logits = out.memory, out.logits[:, -1]
    return torch.cat(produced, dim=1)
