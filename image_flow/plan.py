"""Memory before weights: what each process will hold, from the checkpoint's configs alone.

    python -m image_flow --model Qwen/Qwen-Image --plan        # one process
    python -m image_flow --model Qwen/Qwen-Image --lora-rank 0 --plan 8

Every model is built from its config on the meta device (no weights are read or allocated) and
its parameters counted: the transformer (frozen in the compute dtype; trained weights in float32
with their gradients and AdamW's two moments, the EMA's copy, a full fine-tune's KL reference;
under FSDP2 what is sharded is divided by the number of processes), the VAE, the text encoders
while prompts are encoded (freed before training), the reward models, and the prompt embeddings
(a process holds one batch's; the cache on disk holds every prompt's, its total shown against
the disk's free space). Activations are not counted: they depend on the image
size, the batch and --gradient-checkpointing, and are what the rest of the GPU is for.
"""

import json
import logging

import torch

from .loading import (BUILTIN_EVAL_PROMPTS, check_lora_targets, check_pipeline_class,
                      checkpoint_file, matches, model_classes, pipeline_on_meta, read_prompts)


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
    encoders = {}
    for name, cls in model_classes(path).items():
        if not name.startswith("text_encoder"):
            continue
        config = checkpoint_file(path, f"{name}/config.json")
        if config is None:
            encoders[name] = None
            continue
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
    text_models = text_encoders_on_meta(args.model)
    for name, enc in text_models.items():
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
    family = check_pipeline_class(args.model)
    text_dim = t.config.get("joint_attention_dim") or t.config.get("cap_feat_dim")
    tokens = family.text_tokens(args.max_sequence_length)
    pooled = t.config.get("pooled_projection_dim") or 0
    per_prompt = (tokens * text_dim + pooled) * dtype_bytes
    each = f"{'up to ' if family.own_text_length else ''}{size(per_prompt)} per prompt"
    rows.append(("prompt embeddings (host)", per_prompt * args.batch_size,
                 f"{each} ({tokens} × {text_dim}{f' + {pooled} pooled' if pooled else ''}), a "
                 f"batch at a time"))
    prompts = len(prompt_set(args, family))
    rows.append(("prompt cache (disk)", per_prompt * prompts,
                 f"{prompts} prompts × {each}, in {args.prompt_cache} "
                 f"({size(free_space(args.prompt_cache))} free there)"))
    dtype = {2: torch.bfloat16, 4: torch.float32}[dtype_bytes]
    models = (t, shell.vae, *[e for e in text_models.values() if e is not None])
    largest = max(w.numel() for m in models for w in m.parameters()) * dtype_bytes
    rows.append(("loading (host)", largest,
                 "each model read straight onto the device, one after another, its tensors "
                 "memory-mapped from the files: about the largest tensor at a time, not the "
                 "pipeline"))
    evals = len(read_prompts(args.eval_prompts, BUILTIN_EVAL_PROMPTS))
    rows.append(("VAE decode (activations)", decode_bytes(shell, family, args, dtype),
                 f"peak of one decode of --decode-batch {args.decode_batch} at "
                 f"{args.height}×{args.width} (measured on the meta device), when scoring and "
                 f"evaluating; evaluation's {evals} prompts are sampled --batch-size "
                 f"{args.batch_size} at a time, as training's"))
    # Totals on the device: while training, and while the prompts are encoded (the whole
    # transformer in the compute dtype as loaded, before FSDP2 shards it, and the text encoders).
    device = {what: b or 0 for what, b, _ in rows if not what.endswith(
        ("(host)", "(disk)", "(activations)"))}
    encoders = sum(b for what, b in device.items() if "while encoding" in what)
    training = sum(device.values()) - encoders
    fixed = sum(b for what, b in device.items() if what == "VAE" or what.startswith("reward"))
    rows.append(("on the device, training", training, "the rows above but the text encoders'"))
    rows.append(("on the device, set-up", total * dtype_bytes + fixed + encoders,
                 "the transformer as loaded, the VAE, the rewards and the text encoders, "
                 "before the trained weights' state exists"))
    return rows


class LiveBytes:
    """The most bytes of tensors alive at once while a function runs (a TorchDispatchMode):
    each op's new outputs counted until they are freed, views and in-place results not again.
    On the meta device nothing is allocated, so a real-size model can be measured anywhere."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        meter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in torch.utils._pytree.tree_leaves(out):
                    if isinstance(t, torch.Tensor) and t._base is None and id(t) not in meter.ids:
                        meter.add(t)
                return out

        self.mode, self.ids, self.live, self.peak = Mode(), set(), 0, 0

    def add(self, t):
        import weakref

        n = t.untyped_storage().nbytes()
        self.ids.add(id(t))
        self.live += n
        self.peak = max(self.peak, self.live)
        weakref.finalize(t, self.free, id(t), n)

    def free(self, key, n):
        self.ids.discard(key)
        self.live -= n

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


def decode_bytes(shell, family, args, dtype):
    """Peak bytes of one VAE decode of --decode-batch images, measured on the meta device."""
    from .trainer import latent_shape

    torch.nn.Module.to(shell.vae, dtype)  # (diffusers' own .to warns about float32 modules)
    x = torch.zeros(args.decode_batch, *latent_shape(shell, args.height, args.width),
                    device="meta")
    with torch.no_grad(), LiveBytes() as meter:
        family.decode(shell, x, args.height, args.width)
    return meter.peak


def prompt_set(args, family):
    """Every prompt a run encodes: training, evaluation and the negative one if `family`'s
    guidance needs it, each once."""
    from .flags import unconditional_prompt

    negative = unconditional_prompt(args, family)
    return dict.fromkeys(read_prompts(args.prompts) + read_prompts(
        args.eval_prompts, BUILTIN_EVAL_PROMPTS) + ([] if negative is None else [negative]))


def free_space(folder):
    """Free bytes on the disk that holds `folder` (or would: its nearest existing parent)."""
    import shutil
    from pathlib import Path

    folder = Path(folder).absolute()
    while not folder.exists():
        folder = folder.parent
    return shutil.disk_usage(folder).free


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
