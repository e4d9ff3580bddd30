"""Single-device reference for the trainer: the same data, model, optimizer, schedule and clipping as a
parallel run, with the whole global batch in one plain-torch forward/backward per step."""
from __future__ import annotations

import torch

from lamemo_parallel import LaMemoModel
from pretrain.data.indexed import load_tokens
from pretrain.data.streams import SegmentStreams
from pretrain.config import model_config
from pretrain.optim import build_optimizer, build_scheduler


def reference_run(config, steps: int, dp_size: int):
    """Returns (per-step losses, final state dict, final memory). Dropout must be off for equality."""
    d = config.data
    tokens = load_tokens(d.train)
    streams = [SegmentStreams(tokens, tgt_len=d.tgt_len, dp_size=dp_size, dp_rank=r, micro_batches=d.micro_batches,
                              micro_batch_size=d.micro_batch_size, roll_seed=d.roll_seed) for r in range(dp_size)]
    torch.manual_seed(config.run.seed)
    model = LaMemoModel(model_config(config, config.model.vocab_size)).train()
    optimizer = build_optimizer(model.parameters(), config.optim, torch.device("cpu"))
    scheduler = build_scheduler(optimizer, config.optim, config.run.steps)
    memory, losses = None, []
    for _ in range(steps):
        batches = [mb for s in streams for mb in s.next_step()]       # rank-major, then micro-batch
        inputs = torch.cat([x for x, _ in batches])
        targets = torch.cat([y for _, y in batches])
        out = model(inputs, targets=targets, memory=memory)
        loss = out.nll.mean()
        optimizer.zero_grad()
        loss.backward()
        for p in model.parameters():
            # DeepSpeed (like DDP) gives every parameter a gradient, zero where unused (the look-ahead biases in
            # the first segment), so Adam's step count advances for all; torch would skip a None gradient.
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if config.optim.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.clip_grad)
        optimizer.step()
        scheduler.step()
        memory = out.memory
        losses.append(loss.item())
    return losses, model.state_dict(), memory
