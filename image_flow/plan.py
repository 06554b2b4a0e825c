"""Memory before weights: what each process will hold, from the checkpoint's configs alone.

    python -m image_flow --model Qwen/Qwen-Image --plan        # one process
    python -m image_flow --model Qwen/Qwen-Image --lora-rank 0 --plan 8

Every model is built from its config on the meta device (no weights are read or allocated) and
its parameters counted: the transformer (frozen in the compute dtype; trained weights in float32
with their gradients and AdamW's two moments, the EMA's copy, a full fine-tune's KL reference;
under FSDP2 what is sharded is divided by the number of processes), the VAE, the text encoders
while prompts are encoded (freed before training), the reward models, and the prompt embeddings
(on disk; a process holds one batch's). Activations are not counted: they depend on the image
size, the batch and --gradient-checkpointing, and are what the rest of the GPU is for.
"""

import json
import logging

import torch

from .loading import (check_lora_targets, checkpoint_file, matches, model_index,
                      pipeline_on_meta)


def count(n, units=(("B", 1e9), ("M", 1e6), ("k", 1e3))):
    """12.0 B / 3.2 M / 950 k: parameter counts readable at any size."""
    for unit, scale in units:
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.3g}"


def size(b):
    """3.94 GB / 12.6 MB / 512 B: bytes for the console."""
    return count(b, (("GB", 1e9), ("MB", 1e6), ("kB", 1e3), ("B", 1)))


def n_params(module):
    return sum(p.numel() for p in module.parameters())


def lora_params(transformer, targets, rank):
    """r·(in + out) for every linear layer LoRA adapts."""
    check_lora_targets(transformer, targets)
    return sum(rank * (m.in_features + m.out_features)
               for name, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)
               and any(matches(name, t) for t in targets))


def text_encoders_on_meta(path):
    """{name: module} of the checkpoint's text encoders, built from their configs on meta."""
    import transformers

    encoders = {}
    for name, spec in model_index(path).items():
        if not name.startswith("text_encoder") or not isinstance(spec, list) or not spec[1]:
            continue
        config = checkpoint_file(path, f"{name}/config.json")
        if config is None:
            encoders[name] = None
            continue
        cls = getattr(transformers, spec[1])
        config = cls.config_class.from_dict(json.loads(config.read_text()))
        with torch.device("meta"):
            encoders[name] = cls._from_config(config)
    return encoders


def reward_parameters(name, args):
    """The parameter count of a reward's model, built from its config on the meta device; None
    when the config is not on this machine."""
    import open_clip
    from transformers import CLIPConfig, CLIPModel

    from . import rewards

    logging.getLogger().setLevel(logging.ERROR)  # open_clip's "no pretrained weights": none wanted
    if name == "hps":
        with torch.device("meta"):
            return n_params(open_clip.create_model(
                rewards.open_clip_architecture(args.hps_model), device="meta"))
    model = args.clip_model if name == "clip" else args.pickscore_model
    if name == "clip" and rewards.is_open_clip(model):  # 'hf-hub:org/name' or a folder
        source = model.removeprefix("hf-hub:").removeprefix("local-dir:")
        config = checkpoint_file(source, "open_clip_config.json")
        if config is None:
            return None
        with torch.device("meta"):
            return n_params(open_clip.CLIP(**json.loads(config.read_text())["model_cfg"]))
    config = checkpoint_file(model, "config.json")
    if config is None:
        return None
    with torch.device("meta"):
        return n_params(CLIPModel(CLIPConfig.from_dict(json.loads(config.read_text()))))


def plan(args, world=1, dtype_bytes=2):
    """[(what, bytes per process or None, how it was counted)] for these flags on `world`
    processes; dtype_bytes: the compute dtype's (bf16: 2)."""
    from . import rewards

    shell = pipeline_on_meta(args.model)
    t = shell.transformer
    total = n_params(t)
    rows = []
    if args.lora_rank:
        trained = lora_params(t, args.lora_targets, args.lora_rank)
        rows.append(("transformer, frozen", total * dtype_bytes,
                     f"{count(total)} parameters in the compute dtype, whole on every "
                     f"process (DDP)"))
        shard = 1
    else:
        trained, shard = total, world
        rows.append(("transformer, trained", 4 * total / shard,
                     f"{count(total)} parameters in float32" +
                     (f", sharded over {world} (FSDP2)" if world > 1 else "")))
    what = f"{count(trained)} trained parameters" + (", sharded" if shard > 1 else "")
    if args.lora_rank:
        rows.append(("LoRA adapters", 4 * trained, f"{what}, float32 (rank {args.lora_rank})"))
    rows.append(("gradients", 4 * trained / shard, f"{what}, float32"))
    rows.append(("AdamW moments", 8 * trained / shard, f"{what}: 2 × float32"))
    if args.ema_decay > 0:
        rows.append(("EMA", 4 * trained / shard, f"{what}, float32"))
    if args.kl_beta > 0 and not args.lora_rank:
        rows.append(("KL reference", total * dtype_bytes / shard,
                     "a frozen copy in the compute dtype" + (", sharded" if shard > 1 else "")))
    rows.append(("VAE", n_params(shell.vae) * dtype_bytes, "the compute dtype"))
    for name, enc in text_encoders_on_meta(args.model).items():
        rows.append((f"{name} (while encoding)",
                     None if enc is None else n_params(enc) * dtype_bytes,
                     "config not on this machine" if enc is None else
                     f"{count(n_params(enc))} parameters, freed before training"))
    names = dict.fromkeys(rewards.reward_names(args.rewards) + rewards.reward_names(
        args.eval_rewards or args.rewards))
    for name in names:
        n = reward_parameters(name, args)
        rows.append((f"reward {name}", None if n is None else 4 * n,
                     "config not on this machine" if n is None else
                     f"{count(n)} parameters, float32"))
    text_dim = t.config.get("joint_attention_dim") or t.config.get("cap_feat_dim")
    per_prompt = args.max_sequence_length * text_dim * dtype_bytes
    rows.append(("prompt embeddings (host)", per_prompt * args.batch_size,
                 f"up to {size(per_prompt)} per prompt ({args.max_sequence_length} × "
                 f"{text_dim}), a batch at a time; the cache on disk holds every prompt"))
    # Totals on the device: while training, and while the prompts are encoded (the whole
    # transformer in the compute dtype as loaded, before FSDP2 shards it, and the text encoders).
    device = {what: b or 0 for what, b, _ in rows if "(host)" not in what}
    encoders = sum(b for what, b in device.items() if "while encoding" in what)
    training = sum(device.values()) - encoders
    fixed = sum(b for what, b in device.items() if what == "VAE" or what.startswith("reward"))
    rows.append(("on the device, training", training, "the rows above but the text encoders'"))
    rows.append(("on the device, set-up", total * dtype_bytes + fixed + encoders,
                 "the transformer as loaded, the VAE, the rewards and the text encoders, "
                 "before the trained weights' state exists"))
    return rows


def print_plan(args, world):
    """The plan as the console prints it (--plan)."""
    dtype_bytes = 4 if args.dtype == "fp32" else 2
    rows = plan(args, world, dtype_bytes)
    print(f"memory per process for {args.model} ({args.family}), {world} process(es), "
          f"{'LoRA r=' + str(args.lora_rank) if args.lora_rank else 'full fine-tune'}, "
          f"{'bf16' if dtype_bytes == 2 else 'fp32'} compute; activations not included")
    for what, b, how in rows:
        print(f"  {what:<32}{'?' if b is None else size(b):>10}  {how}")
    return rows
