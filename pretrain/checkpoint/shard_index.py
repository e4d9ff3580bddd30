"""Where each rank's tensors lie inside DeepSpeed's shard files, recorded at save time from the live engine.

One record per piece of a parameter this rank saves: the single-device name, this rank's tensor-parallel
slice (``local_shape``, ``tp_rank``), the range of that slice's flattened elements the piece covers
(``start``, ``numel``: ZeRO splits the flattened slice over data-parallel ranks) and, for the fp32 master
weights and each Adam moment, ``[file, key path, offset]``: the tensor at that key path of that file holds
the piece as ``flat[offset : offset + numel]``. The offline reader (``shards.py``) needs nothing else from
DeepSpeed, whose private layout stays described in this one place:

- fp32, ZeRO 0: weights are the module's own (``module`` of ``mp_rank_XX_model_states.pt``, or per-layer
  ``layer_XX-model_YY-model_states.pt`` under pipelining); Adam state in ``optimizer.state[i]`` of the same
  ``mp_rank`` file (parameter order of the torch optimizer). Only data-parallel rank 0 writes these.
- bf16, ZeRO 0 (DeepSpeed's unfused mixed-precision optimizer): fp32 masters ``optimizer.fp32_groups[g][i]``,
  Adam state ``optimizer.optimizer_state_dict.state[i]``.
- ZeRO 1/2 (fp32 or bf16): per rank ``*zero_pp_rank_D_mp_rank_XX_optim_states.pt``; each parameter group is one
  flat fp32 partition ``optimizer_state_dict.single_partition_of_fp32_groups[g]`` and its Adam state
  ``optimizer_state_dict.base_optimizer_state.state[g]``; a parameter's fragment is DeepSpeed's
  ``_hp_mapping`` (offset in the partition, start and length in the flattened parameter).
- ZeRO 3: ``optimizer_state_dict.fp32_flat_groups[g]`` concatenates every parameter's partition of
  ceil(numel / dp) elements, rank d holding elements [d * p, d * p + p); Adam state
  ``optimizer_state_dict.optimizer_state_dict.state[g]``.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

MOMENTS = ("exp_avg", "exp_avg_sq")


def single_device_parameters(module) -> dict[str, torch.nn.Parameter]:
    """Single-device name -> this rank's parameter (a pipeline stage's tied copies included)."""
    if hasattr(module, "named_model_parameters"):
        return module.named_model_parameters()
    return dict(module.named_parameters())


def _local_shape(param) -> list[int]:
    return list(getattr(param, "ds_shape", None) or param.shape)


def _piece(name, param, start, numel, master, moments) -> dict:
    return {"name": name, "local_shape": _local_shape(param), "start": int(start), "numel": int(numel),
            "master": master, **{key: moments.get(key) for key in MOMENTS}}


def rank_pieces(engine, ckpt_dir: str, tag_dir: str) -> list[dict]:
    """This rank's pieces (see the module docstring). ``ckpt_dir`` is the checkpoint root DeepSpeed was given,
    ``tag_dir`` the checkpoint directory; file names are recorded relative to it."""
    module, opt = engine.module, engine.optimizer
    names = {id(p): n for n, p in single_device_parameters(module).items()}
    rel = lambda path: os.path.relpath(path, tag_dir)       # noqa: E731
    tag = os.path.basename(tag_dir)
    pieces = []
    bit16 = getattr(opt, "bit16_groups", None) or getattr(opt, "bf16_groups", None)
    if bit16 is not None and (hasattr(opt, "single_partition_of_fp32_groups")
                              or hasattr(opt, "fp32_groups_flat_partition")):          # ZeRO 1/2, bf16 ZeRO
        file = rel(engine.shard_file(ckpt_dir, tag, "zero"))
        for g, group in enumerate(bit16):
            for lp in group:
                mapping = getattr(lp, "_hp_mapping", None)
                if mapping is None or id(lp) not in names:
                    continue
                offset = mapping.hp_fragment_address.start
                moments = {k: [file, ["optimizer_state_dict", "base_optimizer_state", "state", g, k], offset]
                           for k in MOMENTS}
                pieces.append(_piece(names[id(lp)], lp, mapping.lp_fragment_address.start,
                                     mapping.lp_fragment_address.numel,
                                     [file, ["optimizer_state_dict", "single_partition_of_fp32_groups", g], offset],
                                     moments))
    elif hasattr(opt, "fp32_partitioned_groups_flat"):                                     # ZeRO 3
        file = rel(engine.shard_file(ckpt_dir, tag, "zero"))
        dp_rank = dist.get_rank(group=opt.dp_process_group)
        for g, group in enumerate(opt.fp16_groups):
            offset = 0
            for p in group:
                part = p.partition_numel()
                start = dp_rank * part
                numel = max(0, min(part, p.ds_numel - start))
                if id(p) in names and numel:
                    moments = {k: [file, ["optimizer_state_dict", "optimizer_state_dict", "state", g, k], offset]
                               for k in MOMENTS}
                    pieces.append(_piece(names[id(p)], p, start, numel,
                                         [file, ["optimizer_state_dict", "fp32_flat_groups", g], offset], moments))
                offset += part
    elif engine.writes_model_file:                                                        # ZeRO 0
        model_file = rel(engine.shard_file(ckpt_dir, tag, "model"))
        weights = _module_weight_locations(module, tag_dir, model_file)
        torch_opt = opt if isinstance(opt, torch.optim.Optimizer) else getattr(opt, "optimizer", None)
        index = {id(p): i for i, p in enumerate(p for g in torch_opt.param_groups for p in g["params"])}
        if hasattr(opt, "fp32_groups") and hasattr(opt, "fp16_groups"):                 # bf16 masters
            masters = {id(p): [model_file, ["optimizer", "fp32_groups", g, i], 0]
                       for g, group in enumerate(opt.fp16_groups) for i, p in enumerate(group)}
            state_key, fp32_params = ["optimizer", "optimizer_state_dict", "state"], {
                id(lp): hp for lg, hg in zip(opt.fp16_groups, opt.fp32_groups) for lp, hp in zip(lg, hg)}
        else:
            masters, state_key, fp32_params = weights, ["optimizer", "state"], {}
        for name, p in single_device_parameters(module).items():
            master = masters.get(id(p))
            if master is None:
                continue
            i = index[id(fp32_params.get(id(p), p))]
            state = torch_opt.state.get(fp32_params.get(id(p), p), {})
            moments = {k: [model_file, [*state_key, i, k], 0] for k in MOMENTS if k in state}
            pieces.append(_piece(name, p, 0, p.numel(), master, moments))
    return pieces


def _module_weight_locations(module, tag_dir, model_file) -> dict[int, list]:
    """id(param) -> [file, key, 0] of the module weights DeepSpeed writes (ZeRO 0)."""
    if not hasattr(module, "forward_funcs"):
        return {id(p): [model_file, ["module", n], 0] for n, p in module.named_parameters()}
    out = {}
    for local, layer in enumerate(module.forward_funcs):
        if not isinstance(layer, torch.nn.Module) or not list(layer.parameters()):
            continue
        path = os.path.relpath(module.ckpt_layer_path(tag_dir, local), tag_dir)
        for n, p in layer.named_parameters():
            out.setdefault(id(p), [path, [n], 0])
    return out
