"""Image rewards for flux_flow.py: images in [0, 1] (B, 3, H, W) and prompts → (B,) scores.

- clip: cosine of CLIP image and text embeddings (CLIP score);
- pickscore: the same on PickScore_v1 with its learned logit scale (exp(logit_scale)·cos / 100);
- hps: HPS-v2.1 through the hpsv2 package, if the user installed it (never a dependency).

Weights load from local folders or already-downloaded Hub ids; a missing one is named.
"""

import torch

REWARD_NAMES = ("clip", "pickscore", "hps")



class ClipReward:
    """Cosine similarity of CLIP image and text embeddings (CLIP score; PickScore with scale).

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
            raise OSError(f"could not load reward model {model_id!r} (processor "
                          f"{processor_id or model_id!r}): {e}. Download it first (there is no "
                          f"network here at run time) or pass a local folder.") from e
        crop = ip.crop_size  # a dict, or transformers 5's SizeDict, or an int in old configs
        self.size = (crop, crop) if isinstance(crop, int) else (crop["height"], crop["width"])
        self.mean = torch.tensor(ip.image_mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(ip.image_std, device=device).view(1, 3, 1, 1)
        self.pickscore, self.device = pickscore, device

    def preprocess(self, images):
        """Resize the shorter side to the crop size (bicubic), centre-crop, normalise."""
        h, w = images.shape[-2:]
        scale = max(self.size[0] / h, self.size[1] / w)
        size = (max(self.size[0], round(h * scale)), max(self.size[1], round(w * scale)))
        x = torch.nn.functional.interpolate(images, size=size, mode="bicubic", antialias=True,
                                            align_corners=False)
        top, left = (size[0] - self.size[0]) // 2, (size[1] - self.size[1]) // 2
        x = x[..., top : top + self.size[0], left : left + self.size[1]]
        return (x.clamp(0, 1) - self.mean) / self.std

    @torch.no_grad()
    def __call__(self, images, prompts):
        tok = self.tokenizer(list(prompts), padding="max_length", truncation=True,
                             max_length=self.model.config.text_config.max_position_embeddings,
                             return_tensors="pt").to(self.device)
        feats = lambda out: out if torch.is_tensor(out) else out.pooler_output
        t = feats(self.model.get_text_features(**tok)).float()
        i = feats(self.model.get_image_features(
            pixel_values=self.preprocess(images.to(self.device).float()))).float()
        cos = torch.nn.functional.cosine_similarity(i, t, dim=-1)
        return cos * self.model.logit_scale.exp().float() / 100 if self.pickscore else cos


class HPSReward:
    """HPS-v2.1 through the `hpsv2` package, if the user installed it (never a dependency)."""

    def __init__(self, version="v2.1"):
        try:
            import hpsv2
        except ImportError as e:
            raise ImportError("the 'hps' reward needs the hpsv2 package and its HPS-v2.1 "
                              "checkpoint: pip install hpsv2 (docs/gpu.md, Rewards)") from e
        self.hpsv2, self.version = hpsv2, version

    @torch.no_grad()
    def __call__(self, images, prompts):
        from PIL import Image

        out = []
        for img, p in zip(images, prompts):
            arr = (img.permute(1, 2, 0).cpu().numpy() * 255).round().astype("uint8")
            out.append(float(self.hpsv2.score([Image.fromarray(arr)], p,
                                              hps_version=self.version)[0]))
        return torch.tensor(out)


def reward_names(spec):
    """'clip,pickscore' → ['clip', 'pickscore'], refusing unknown or missing names."""
    names = [n.strip() for n in spec.split(",") if n.strip()] if isinstance(spec, str) else spec
    if not names:
        raise ValueError("at least one reward is needed (--rewards clip,pickscore,hps)")
    for n in names:
        if n not in REWARD_NAMES:
            raise ValueError(f"unknown reward {n!r}; choose from {', '.join(REWARD_NAMES)}")
    return names


def load_rewards(names, device, clip_model, pickscore_model, pickscore_processor):
    """Reward objects for a comma-separated list of names (clip, pickscore, hps)."""
    rewards = {}
    for n in reward_names(names):
        if n == "clip":
            rewards[n] = ClipReward(clip_model, device=device)
        elif n == "pickscore":
            rewards[n] = ClipReward(pickscore_model, pickscore_processor, device, pickscore=True)
        else:
            rewards[n] = HPSReward()
    return rewards
