"""Processes and where the weights live: torchrun set-up, DDP for a LoRA, FSDP2 for a full
fine-tune, the reference policy of the KL penalty (--kl-beta), which costs a LoRA no weights and
a full fine-tune one frozen copy, sharded like the policy, and what the ranks agree on (flags,
averaged metrics, identical weights).
"""

import contextlib
import json
import os

import torch
import torch.distributed as dist


def init_distributed():
    """(rank, world_size, device); one process without torchrun works unchanged."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), torch.device(f"cuda:{local}" if cuda else "cpu")


def blocks_to_shard(transformer):
    """The modules FSDP2 shards one by one: those whose class the model lists in diffusers'
    `_no_split_modules` (FLUX.1: its double- and single-stream blocks), outermost only."""
    names = set(getattr(transformer, "_no_split_modules", None) or ())
    if not names:
        raise ValueError(f"{type(transformer).__name__} declares no _no_split_modules: FSDP2 "
                         f"would gather the whole model at once")
    blocks, inside = [], ()
    for name, module in transformer.named_modules():
        if type(module).__name__ in names and not name.startswith(inside):
            blocks.append(module)
            inside = (*inside, name + ".")
    if not blocks:
        raise ValueError(f"{type(transformer).__name__} holds none of its _no_split_modules "
                         f"{sorted(names)}")
    return blocks


def shard(transformer):
    """FSDP2: fully_shard per block (blocks_to_shard), then the root (a no-op without torchrun).

    The root reshards after every forward too. FSDP2's default keeps the root's parameters
    unsharded after a forward until the backward that follows; after a forward without
    gradient (evaluation, the rollout, the KL's reference) no backward follows, and they stay
    unsharded: model.parameters() then yields temporary tensors instead of the sharded ones the
    optimizer and the EMA hold, and EMA.applied() would leave its values in them.
    """
    if dist.is_initialized():
        from torch.distributed.fsdp import fully_shard

        for block in blocks_to_shard(transformer):
            fully_shard(block)
        # Costs one all-gather of the root's parameters (embedders, final norm and projection:
        # ~0.3 % of FLUX.1's weights) per forward, beside the blocks' own.
        fully_shard(transformer, reshard_after_forward=True)
    return transformer


def wrap_distributed(transformer, lora_rank, device, unused_parameters=False):
    """DDP for LoRA; FSDP2 (fully_shard per block, then the root, then fp32 shards) for full.
    unused_parameters: some trainable weights get no gradient (DDP then looks for them after
    every backward)."""
    if not dist.is_initialized():
        return transformer
    if lora_rank > 0:
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(transformer, device_ids=[device.index] if device.type == "cuda" else None,
                   broadcast_buffers=False, find_unused_parameters=unused_parameters)
    return shard(transformer).float()  # each rank upcasts only its own shards


def frozen_reference(transformer, dtype):
    """Full fine-tune's reference policy for --kl-beta: a frozen copy of the pretrained
    transformer in the compute dtype. One process: a copy, taken before setup_trainable upcasts
    the policy. FSDP2 (the policy already sharded): built on the meta device, sharded the same
    way, and each rank copies its own shards, so no rank ever holds the whole copy."""
    import copy

    if not dist.is_initialized():
        return copy.deepcopy(transformer).to(dtype).requires_grad_(False).eval()
    with torch.device("meta"):
        reference = type(transformer).from_config(transformer.config).to(dtype)
    shard(reference).to_empty(device=next(transformer.parameters()).device)
    policy = dict(transformer.named_parameters())
    with torch.no_grad():
        for name, p in reference.named_parameters():  # same layout: local shard to local shard
            p.to_local().copy_(policy[name].to_local())
    return reference.requires_grad_(False).eval()


@contextlib.contextmanager
def adapters_disabled(transformer):
    """LoRA's reference policy: the same transformer with its adapters switched off (no extra
    weights). peft freezes the adapters while they are off; they are trainable again after."""
    trainable = [p for p in transformer.parameters() if p.requires_grad]
    transformer.disable_adapters()
    try:
        yield
    finally:
        transformer.enable_adapters()
        for p in trainable:
            p.requires_grad_(True)


# ----------------------------------------------------------------------------------------------
# Across ranks.


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def reduce_flag(flag, op):
    """A bool combined over the ranks with `op` (MIN: all, MAX: any); itself on one process."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return bool(flag)
    t = torch.tensor([1 if flag else 0])
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=op)
    return bool(t.item())


def all_agree(ok):
    """True on every rank when `ok` holds on every rank (one all-reduce)."""
    return reduce_flag(ok, dist.ReduceOp.MIN)



SAME_ON_EVERY_RANK = ("iteration", "window")  # by construction: not averaged


def all_reduce_metrics(metrics, world_size):
    """Average every number (and list of numbers) in a metrics dict over the ranks; integers
    whose average is a whole number (counts the same on every rank) stay integers."""
    if world_size == 1:
        return metrics
    keys = [k for k, v in metrics.items()
            if isinstance(v, (int, float, list)) and k not in SAME_ON_EVERY_RANK]
    flat = [torch.tensor(metrics[k], dtype=torch.float64).flatten() for k in keys]
    t = torch.cat(flat)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    t = (t / world_size).cpu()
    out, i = dict(metrics), 0
    for k, f in zip(keys, flat):
        v = t[i : i + len(f)].tolist()
        if isinstance(metrics[k], int) and v[0].is_integer():
            v = [int(v[0])]
        out[k] = v if isinstance(metrics[k], list) else v[0]
        i += len(f)
    return out


def check_ranks_in_sync(params, out, is_main):
    """Every rank must hold the same weights after training; record the checksums, fail loudly."""
    local = torch.stack([p.detach().double().sum() if not hasattr(p, "full_tensor")
                         else p.full_tensor().detach().double().sum() for p in params]).sum()
    sums = [None] * dist.get_world_size()
    dist.all_gather_object(sums, local.item())
    if is_main:
        (out / "rank_checksums.json").write_text(json.dumps(sums))
    if len(set(sums)) != 1:
        raise RuntimeError(f"trainable weights differ across ranks after training: {sums}")
