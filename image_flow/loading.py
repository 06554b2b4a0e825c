"""The pipeline and the prompts: what a checkpoint is (read from its files before any weights
load), loading it, and the prompt files.

A checkpoint is a local folder in save_pretrained's layout or a Hub id. Its configs (a few KB)
are read before anything loads, from the folder, the Hugging Face cache or the Hub; the weights
load with from_pretrained.
"""

import json
import warnings
from pathlib import Path

import torch

from .families import family_for, weightless_pipeline

BUILTIN_PROMPTS = [
    "a red fox sitting in fresh snow, golden hour",
    "a lighthouse on a cliff during a storm, dramatic clouds",
    "a bowl of ramen with a soft-boiled egg, studio lighting",
    "an astronaut riding a horse on the moon, photorealistic",
    "a cozy reading nook with a cat asleep on a pile of books",
    "a watercolor painting of a venetian canal at dawn",
    "a futuristic city skyline at night with flying cars",
    "a close-up portrait of an old fisherman, film grain",
    "a hummingbird drinking from a purple flower, macro photo",
    "a medieval castle on a hill surrounded by autumn forest",
    "a glass of iced coffee on a wooden table, morning light",
    "an origami crane made of newspaper, soft shadows",
    "a snowy mountain lake reflecting the milky way",
    "a vintage red bicycle leaning against a blue door",
    "a steampunk owl made of brass gears",
    "a field of sunflowers under a thunderstorm sky",
]
BUILTIN_EVAL_PROMPTS = [
    "a corgi wearing a tiny wizard hat, digital art",
    "a tranquil japanese garden with a red bridge",
    "a plate of colorful macarons on a marble counter",
    "a polar bear walking across an ice floe at sunset",
]


def checkpoint_file(path, name):
    """A file of a diffusers checkpoint: in a local folder, in the Hugging Face cache, or fetched
    from the Hub (configs: a few KB); None when it is nowhere (no such file, or offline)."""
    if Path(path).is_dir():
        f = Path(path) / name
        return f if f.is_file() else None
    if path.count("/") != 1:
        return None
    from huggingface_hub import errors, hf_hub_download, try_to_load_from_cache

    cached = try_to_load_from_cache(path, name)
    if isinstance(cached, str):
        return Path(cached)
    try:
        return Path(hf_hub_download(path, name))
    except errors.GatedRepoError:  # before RepositoryNotFoundError, its parent
        raise OSError(f"--model: {path!r} is gated on the Hub: accept its conditions at "
                      f"https://huggingface.co/{path}, then log in (`hf auth login`) or set "
                      f"HF_TOKEN") from None
    except errors.RepositoryNotFoundError:
        raise OSError(f"--model: the Hub has no repository {path!r} that this account can see "
                      f"(a typo, or a private one: log in with `hf auth login`)") from None
    except Exception:  # offline, no network, no such file: the caller says which
        return None


def required_file(path, name):
    """checkpoint_file, or an OSError naming the file and how to fetch it."""
    f = checkpoint_file(path, name)
    if f is not None:
        return f
    if Path(path).is_dir() or path.count("/") != 1:
        where = (f"the folder {path!r} has no {name}" if Path(path).is_dir() else
                 f"{path!r} is neither a folder nor a Hub id (org/name)")
        raise OSError(f"--model: {where}; a diffusers checkpoint in save_pretrained's layout is "
                      f"needed")
    import huggingface_hub

    if huggingface_hub.is_offline_mode():
        raise OSError(f"--model: {name} of {path!r} is not in the Hugging Face cache and "
                      f"HF_HUB_OFFLINE is set; fetch it first with `hf download {path}`")
    raise OSError(f"--model: {name} of {path!r} is neither in the Hugging Face cache nor in the "
                  f"Hub repository (or the Hub cannot be reached); fetch the checkpoint with "
                  f"`hf download {path}`")


def model_index(path):
    """The checkpoint's model_index.json as a dict (an OSError when it has none)."""
    return json.loads(required_file(path, "model_index.json").read_text())


def check_pipeline_class(path):
    """The Family of the checkpoint's pipeline class (model_index.json's _class_name); another
    class is refused before any weights load."""
    try:
        return family_for(model_index(path).get("_class_name"))
    except ValueError as e:
        raise ValueError(f"--model {path}: {e}") from None


def model_classes(path):
    """{component: its class} for the checkpoint's models (diffusers' and transformers' modules,
    as model_index.json names them; tokenizers and the scheduler left out)."""
    import importlib

    classes = {}
    for name, spec in model_index(path).items():
        if (isinstance(spec, list) and len(spec) == 2 and spec[1]
                and spec[0] in ("diffusers", "transformers")):
            cls = getattr(importlib.import_module(spec[0]), spec[1])
            if issubclass(cls, torch.nn.Module):
                classes[name] = cls
    return classes


def load_pipeline(path, device="cpu", dtype=torch.float32):
    """The family's pipeline class .from_pretrained(path), every model in it frozen and in eval
    mode (the trainer never switches modes: sampling == training).

    Each model component is read straight onto `device` (from_pretrained's device_map), one
    after another: a process never holds the whole pipeline in host memory on its way to a GPU,
    so neither do the ranks of one node together. The tokenizers and the scheduler come with
    the pipeline's own from_pretrained."""
    import diffusers

    family = check_pipeline_class(path)
    cls, what = getattr(diffusers, family.pipeline), family.pipeline
    try:
        with warnings.catch_warnings():  # newer diffusers renames torch_dtype to dtype
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            # device_map needs accelerate, which peft requires.
            models = {name: model.from_pretrained(path, subfolder=name, torch_dtype=dtype,
                                                  device_map={"": torch.device(device)})
                      for name, model in model_classes(path).items()}
            pipe = cls.from_pretrained(path, torch_dtype=dtype, **models)
    except (OSError, ValueError) as e:
        raise OSError(f"could not load {what} from {path!r}: {e}. Pass a local folder "
                      f"(save_pretrained layout) or a Hub id that is already downloaded.") from e
    for m in pipe.components.values():
        if isinstance(m, torch.nn.Module):
            m.requires_grad_(False).eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def read_prompts(path=None, builtin=BUILTIN_PROMPTS):
    """Prompts from a UTF-8 text file (one per line, blank lines skipped, a BOM dropped), or the
    built-in list."""
    if path is None:
        return list(builtin)
    p = Path(path)
    if p.is_dir():
        raise IsADirectoryError(f"prompt file {str(path)!r} is a directory, not a text file")
    if not p.is_file():
        raise FileNotFoundError(f"prompt file {str(path)!r} does not exist")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"prompt file {str(path)!r} is not UTF-8 text (byte {e.start}: "
                         f"{e.reason})") from None
    except OSError as e:
        raise OSError(f"prompt file {str(path)!r} cannot be read: {e.strerror or e}") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompt file {str(path)!r} holds no prompts (one per line expected)")
    return prompts


def matches(name, target):
    """Whether a LoRA target names this module, as peft matches it: its name or dotted ending."""
    return name == target or name.endswith("." + target)


def check_lora_targets(transformer, targets):
    """Each target must name (as peft matches it) a linear layer of the transformer; a
    ValueError lists the names there are."""
    linear = [n for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)]
    for t in targets:
        if not any(matches(n, t) for n in linear):
            ends = sorted({".".join(n.split(".")[-2:]) if n.split(".")[-1].isdigit()
                           else n.split(".")[-1] for n in linear})
            raise ValueError(f"--lora-targets: {t!r} names no linear layer of the "
                             f"{type(transformer).__name__}; its linear layers end in "
                             f"{', '.join(ends)}")


def pipeline_on_meta(path):
    """The checkpoint's pipeline class around its transformer and VAE built from their configs
    on the meta device and its scheduler (no weights; the text encoders left out): sizes, ids,
    LoRA targets and σ grids can be checked before loading."""
    index = model_index(path)
    import diffusers

    models = {}
    with torch.device("meta"):
        for name in ("transformer", "vae"):  # model_index: {"vae": ["diffusers", "<class>"]}
            config = json.loads(required_file(path, f"{name}/config.json").read_text())
            models[name] = getattr(diffusers, index[name][1]).from_config(config)
    config = json.loads(required_file(path, "scheduler/scheduler_config.json").read_text())
    models["scheduler"] = getattr(diffusers, index["scheduler"][1]).from_config(config)
    return weightless_pipeline(index["_class_name"], **models)
