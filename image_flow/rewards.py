"""Image rewards for every model adapter: images in [0, 1] (B, 3, H, W) and prompts → (B,) scores.

- hps: HPS-v2.1, the paper's reward: OpenCLIP's ViT-H-14 with the HPS-v2.1 checkpoint (read once,
  no pretrained download), the cosine of image and text embeddings as HPS computes it;
- clip: CLIP score, the same cosine on a CLIP: an OpenCLIP one (the official recipe's
  hf-hub:apple/DFN5B-CLIP-ViT-H-14-378, or a local OpenCLIP folder) or a transformers CLIPModel;
- pickscore: PickScore_v1 (a transformers CLIP) with its learned logit scale.

Every reward scores a batch of image tensors at once (no PIL round trip); OpenCLIP images are
preprocessed on tensors exactly as the model's validation transform does (HPS's own transform
resizes tensors too). Weights load from local files or the Hugging Face cache; a missing one is
named with the command that fetches it. docs/rewards.md says which reward the paper used where.
"""

import os
import pickle
from pathlib import Path

import torch

REWARD_NAMES = ("clip", "pickscore", "hps")
HPS_CHECKPOINT = "xswu/HPSv2/HPS_v2.1_compressed.pt"  # a Hub file (repo/filename) or a path
HPS_ARCHITECTURE = "ViT-H-14"  # the OpenCLIP model HPS-v2.1 fine-tuned
DEFAULTS = {"clip_model": "openai/clip-vit-large-patch14",
            "pickscore_model": "yuvalkirstain/PickScore_v1",
            "pickscore_processor": "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
            "hps_checkpoint": HPS_CHECKPOINT, "hps_model": HPS_ARCHITECTURE}


class RewardModelError(OSError):
    """A reward model that cannot be loaded: the message names it and how to fetch it."""


def _fetch_hint(repo, filename=None):
    what = f"{repo} {filename}" if filename else repo
    return (f"fetch it first with `hf download {what}` (nothing is downloaded while "
            f"HF_HUB_OFFLINE=1 is set), or pass a local path")


class ClipReward:
    """Cosine similarity of a transformers CLIP's image and text embeddings (CLIP score).

    PickScore is the same computation on the PickScore_v1 CLIP with its learned logit scale:
    exp(logit_scale)·cos / 100 (so values sit near the paper's ~0.22).
    """

    def __init__(self, model_id, processor_id=None, device="cpu", pickscore=False):
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

        try:
            self.model = CLIPModel.from_pretrained(model_id).to(device).eval().requires_grad_(False)
            proc_id = processor_id or model_id
            self.tokenizer = AutoTokenizer.from_pretrained(proc_id)
            ip = CLIPImageProcessor.from_pretrained(proc_id)
        except OSError as e:
            raise RewardModelError(
                f"could not load reward model {model_id!r} (processor {processor_id or model_id!r})"
                f": {e}. {_fetch_hint(model_id)}") from e
        crop = ip.crop_size  # a dict, or transformers 5's SizeDict, or an int in old configs
        self.size = (crop, crop) if isinstance(crop, int) else (crop["height"], crop["width"])
        size = ip.size if isinstance(ip.size, int) else ip.size.get("shortest_edge")
        self.shortest_edge = size or min(self.size)
        self.mean = torch.tensor(ip.image_mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(ip.image_std, device=device).view(1, 3, 1, 1)
        self.pickscore, self.device = pickscore, device

    def preprocess(self, images):
        """Resize the shorter side to the processor's shortest_edge (bicubic, antialiased), the
        longer side truncated as CLIPImageProcessor computes it, centre-crop, normalise."""
        h, w = images.shape[-2:]
        short, long = sorted((h, w))
        resized = (self.shortest_edge, int(self.shortest_edge * long / short))
        size = resized if h <= w else resized[::-1]
        x = torch.nn.functional.interpolate(images, size=size, mode="bicubic", antialias=True,
                                            align_corners=False)
        top, left = (size[0] - self.size[0]) // 2, (size[1] - self.size[1]) // 2
        x = x[..., top : top + self.size[0], left : left + self.size[1]]
        return (x.clamp(0, 1) - self.mean) / self.std

    @torch.no_grad()
    def __call__(self, images, prompts):
        check_images(images, prompts)
        tok = self.tokenizer(list(prompts), padding="max_length", truncation=True,
                             max_length=self.model.config.text_config.max_position_embeddings,
                             return_tensors="pt").to(self.device)
        feats = lambda out: out if torch.is_tensor(out) else out.pooler_output
        t = feats(self.model.get_text_features(**tok)).float()
        i = feats(self.model.get_image_features(
            pixel_values=self.preprocess(images.to(self.device).float()))).float()
        cos = torch.nn.functional.cosine_similarity(i, t, dim=-1)
        return cos * self.model.logit_scale.exp().float() / 100 if self.pickscore else cos


class OpenClipReward:
    """Cosine similarity of an OpenCLIP model's normalised image and text embeddings: HPS-v2.1
    (``OpenClipReward.hps``) and OpenCLIP CLIP scores (``OpenClipReward.pretrained``).

    The images are preprocessed on tensors by the model's own validation settings (size, resize
    mode, interpolation, mean, std), antialiased as torchvision resizes tensors; nothing is
    clamped, as in HPS's transform. Each distinct prompt of a batch is encoded once.
    """

    def __init__(self, model, tokenizer, device="cpu"):
        import open_clip

        self.model = model.to(device).eval().requires_grad_(False)
        self.tokenizer, self.device = tokenizer, device
        cfg = open_clip.get_model_preprocess_cfg(self.model)
        size = cfg.get("size", 224)
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.resize_mode = cfg.get("resize_mode", "shortest")
        self.interpolation = cfg.get("interpolation", "bicubic")
        if self.resize_mode not in ("shortest", "squash"):
            raise ValueError(f"OpenCLIP resize_mode {self.resize_mode!r} is not supported here "
                             f"(shortest, squash)")
        if self.resize_mode == "shortest" and self.size[0] != self.size[1]:
            raise ValueError(f"resize_mode 'shortest' needs a square image size, got {self.size}")
        self.mean = torch.tensor(cfg["mean"], device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg["std"], device=device).view(1, 3, 1, 1)

    @classmethod
    def hps(cls, checkpoint=HPS_CHECKPOINT, device="cpu", architecture=HPS_ARCHITECTURE):
        """HPS-v2.1: the OpenCLIP architecture (a built-in name or a JSON config file) built
        without pretrained weights, then the HPS checkpoint ({'state_dict': …}) loaded into it,
        once. The checkpoint is a local file or a file in the Hugging Face cache (repo/filename)."""
        import open_clip

        path = resolve_file(checkpoint, "--hps-checkpoint")
        name = open_clip_architecture(architecture)
        try:
            model = open_clip.create_model(name, pretrained=path, device="cpu",
                                           require_pretrained=True)
        except (RuntimeError, AssertionError) as e:  # keys or shapes of another architecture
            raise RewardModelError(f"{path} is not an HPS checkpoint for OpenCLIP {name}: "
                                   f"{e}") from e
        except pickle.UnpicklingError as e:  # torch.load(weights_only=True) refused an object
            raise RewardModelError(f"{path} holds more than tensors (torch.load with "
                                   f"weights_only=True refused it): {e}") from e
        return cls(model, open_clip.get_tokenizer(name), device)

    @classmethod
    def pretrained(cls, model_id, device="cpu"):
        """An OpenCLIP CLIP with its weights: 'hf-hub:org/name' from the Hugging Face cache, or a
        local folder with open_clip_config.json and its weights ('local-dir:' optional)."""
        import open_clip

        name = _open_clip_source(model_id)
        try:  # hf-hub: the cache first; the Hub only when reachable and HF_HUB_OFFLINE unset
            model = open_clip.create_model_from_pretrained(name, device="cpu",
                                                            return_transform=False)
        except RuntimeError as e:
            hint = _fetch_hint(name[len("hf-hub:"):]) if name.startswith("hf-hub:") else ""
            raise RewardModelError(f"could not load OpenCLIP model {model_id!r}: {e}. "
                                   f"{hint}") from e
        return cls(model, open_clip.get_tokenizer(name), device)

    def preprocess(self, images):
        """(B, 3, H, W) in [0, 1] → the model's input: resize (the shorter side to the size and a
        centre crop, or straight to the size for 'squash'), then normalise."""
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as F

        mode = InterpolationMode(self.interpolation)
        if self.resize_mode == "squash":
            x = F.resize(images, list(self.size), mode, antialias=True)
        else:
            x = F.center_crop(F.resize(images, self.size[0], mode, antialias=True),
                              list(self.size))
        return (x - self.mean) / self.std

    @torch.no_grad()
    def __call__(self, images, prompts):
        # Differs from the official scripts: float tensors scored in float32, not 8-bit PIL images
        # under fp16 autocast; the CLIP score's text goes through its own model's tokenizer, not
        # HPS's (the same OpenAI BPE, 77 tokens, unless the model's config names another).
        check_images(images, prompts)
        unique = list(dict.fromkeys(prompts))
        text = self.model.encode_text(self.tokenizer(unique).to(self.device), normalize=True)
        text = text[[unique.index(p) for p in prompts]]
        image = self.model.encode_image(self.preprocess(images.to(self.device).float()),
                                        normalize=True)
        return (image.float() * text.float()).sum(-1)


def check_images(images, prompts):
    """A reward's input: (B, 3, H, W) finite values in [0, 1] and B prompts."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"rewards take images (B, 3, H, W), got shape {tuple(images.shape)}")
    if len(prompts) != len(images):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    if not torch.isfinite(images).all():
        raise ValueError("images hold NaN or inf values")
    lo, hi = images.min().item(), images.max().item()
    if lo < 0 or hi > 1:
        raise ValueError(f"rewards take images in [0, 1], got values in [{lo:.4g}, {hi:.4g}]")


def open_clip_architecture(architecture):
    """An OpenCLIP architecture name, registering a JSON config file first (its file stem)."""
    import open_clip

    if architecture.endswith(".json"):
        if not os.path.isfile(architecture):
            raise RewardModelError(f"--hps-model: no OpenCLIP config file {architecture}")
        open_clip.add_model_config(architecture)
        return Path(architecture).stem
    if open_clip.get_model_config(architecture) is None:
        raise ValueError(f"--hps-model: {architecture!r} is not an OpenCLIP architecture (nor a "
                         f"JSON config file)")
    return architecture


def is_open_clip(model_id):
    """Whether a --clip-model value names an OpenCLIP model rather than a transformers CLIP."""
    return (model_id.startswith(("hf-hub:", "local-dir:"))
            or (Path(model_id) / "open_clip_config.json").is_file())


def _open_clip_source(model_id):
    """A --clip-model value → open_clip's name for it: 'hf-hub:org/name' as is, a folder (with
    or without 'local-dir:') checked for its config and weights first."""
    if model_id.startswith("hf-hub:"):
        return model_id
    folder = Path(model_id[len("local-dir:"):] if model_id.startswith("local-dir:") else model_id)
    if not (folder / "open_clip_config.json").is_file():
        raise RewardModelError(f"OpenCLIP model {model_id!r}: no open_clip_config.json in "
                               f"{folder}")
    if not any(any(folder.glob(g)) for g in ("*.safetensors", "*.bin", "*.pth")):
        raise RewardModelError(f"OpenCLIP model {model_id!r}: no weights in {folder}")
    return f"local-dir:{folder}"


def resolve_file(spec, flag):
    """A local file, or 'org/repo/filename' in the Hugging Face cache (downloaded only when the
    Hub is reachable and HF_HUB_OFFLINE is not set); a missing one is named with its fetch."""
    if os.path.isfile(spec):
        return spec
    parts = spec.split("/")
    if len(parts) < 3 or os.path.exists(parts[0]) or spec.startswith((".", "/", "~")):
        raise RewardModelError(f"{flag}: no file {spec}")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo, filename = "/".join(parts[:2]), "/".join(parts[2:])
    try:
        return hf_hub_download(repo, filename)
    except (LocalEntryNotFoundError, OSError) as e:
        raise RewardModelError(f"{flag}: {spec} is neither a file nor in the Hugging Face cache "
                               f"(repo {repo}, file {filename}): "
                               f"{_fetch_hint(repo, filename)}") from e


def reward_names(spec, flag="--rewards"):
    """'clip,pickscore' → ['clip', 'pickscore'], refusing unknown, repeated or missing names."""
    names = [n.strip() for n in spec.split(",") if n.strip()] if isinstance(spec, str) else spec
    if not names:
        raise ValueError(f"{flag}: at least one reward is needed ({', '.join(REWARD_NAMES)})")
    for n in names:
        if n not in REWARD_NAMES:
            raise ValueError(f"{flag}: unknown reward {n!r}; choose from "
                             f"{', '.join(REWARD_NAMES)}")
    if len(set(names)) < len(names):
        raise ValueError(f"{flag}: a reward is listed twice in {spec!r}")
    return list(names)


def load_rewards(names, device="cpu", **models):
    """Reward objects for a list of names, each model loaded once: ``models`` overrides
    DEFAULTS (clip_model, pickscore_model, pickscore_processor, hps_checkpoint, hps_model)."""
    unknown = set(models) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"unknown reward model settings {sorted(unknown)}")
    m = {**DEFAULTS, **{k: v for k, v in models.items() if v is not None}}
    rewards = {}
    for n in reward_names(names):
        if n == "clip" and is_open_clip(m["clip_model"]):
            rewards[n] = OpenClipReward.pretrained(m["clip_model"], device)
        elif n == "clip":
            rewards[n] = ClipReward(m["clip_model"], device=device)
        elif n == "pickscore":
            rewards[n] = ClipReward(m["pickscore_model"], m["pickscore_processor"], device,
                                    pickscore=True)
        else:
            rewards[n] = OpenClipReward.hps(m["hps_checkpoint"], device, m["hps_model"])
    return rewards
