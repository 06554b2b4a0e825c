"""image_flow/rewards.py offline, on tiny OpenCLIP models with random weights: HPS-v2.1 as HPS computes it,
OpenCLIP CLIP scores from a folder and from the Hugging Face cache, and what they refuse.

The tiny HPS checkpoint is saved in HPS's own format ({'state_dict': …}, as HPS_v2.1_compressed.pt
is read by hpsv2 1.2.0) for an OpenCLIP architecture registered from a JSON config.
"""

import json
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

from image_flow import rewards
from image_flow.tiny import TINY_OPEN_CLIP, make_tiny_open_clip

PROMPTS = ["a cat", "a dog on a hill", "a cat"]


def in_hub_cache(cache, repo, files):
    """Put `files` (name → local path) into a Hugging Face cache folder as repo's main revision
    (the layout huggingface_hub reads offline)."""
    folder = Path(cache) / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for name, source in files.items():
        (snapshot / name).write_bytes(Path(source).read_bytes())
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text("0" * 40)


def hps_reward(tiny_hps):
    checkpoint, architecture = tiny_hps
    return rewards.OpenClipReward.hps(checkpoint, "cpu", architecture)


def smooth_images(n, h, w, seed=0):
    """Images in [0, 1] with structure at several scales (as decoded images have)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, max(h // 8, 1), max(w // 8, 1), generator=g)
    x = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear")
    return (0.8 * x + 0.2 * torch.rand(n, 3, h, w, generator=g)).clamp(0, 1)


def to_pil(images):
    from PIL import Image

    return [Image.fromarray((im.permute(1, 2, 0).numpy() * 255).round().astype("uint8"))
            for im in images]


def hps_val_transform(size, mean, std):
    """HPS's validation transform as hpsv2 1.2.0 composes it (src/open_clip/transform.py,
    image_transform(is_train=False)): to a tensor first, then a bicubic resize of the shorter
    side, a centre crop and the normalisation."""
    from torchvision import transforms as T

    return T.Compose([lambda im: im.convert("RGB"), T.ToTensor(),
                      T.Resize(size, interpolation=T.InterpolationMode.BICUBIC),
                      T.CenterCrop(size), T.Normalize(mean, std)])


@pytest.mark.parametrize("h,w", [(32, 32), (40, 56), (72, 48)])
def test_hps_preprocessing_is_hps_transform_and_open_clip_within_rounding(tiny_hps, h, w):
    import open_clip
    from torchvision.transforms.functional import to_tensor

    reward = hps_reward(tiny_hps)
    images = to_pil(smooth_images(3, h, w))
    ours = reward.preprocess(torch.stack([to_tensor(im) for im in images]))
    mean, std = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
    hps = torch.stack([hps_val_transform(32, mean, std)(im) for im in images])
    torch.testing.assert_close(ours, hps, atol=1e-6, rtol=0)
    # open_clip 3's own validation transform resizes the 8-bit PIL image and rounds the result
    # to 8 bits; ours (and HPS's) resize the tensor: within 1.5 grey levels of 255.
    _, _, val = open_clip.create_model_and_transforms("TinyHPS", pretrained=tiny_hps[0])
    theirs = torch.stack([val(im) for im in images])
    pixels = (ours - theirs) * torch.tensor(std).view(1, 3, 1, 1)
    assert pixels.abs().max() <= 1.5 / 255
    assert pixels.abs().mean() <= 0.5 / 255
    # ... and on the same tensors, exactly open_clip's transform.
    torch.testing.assert_close(ours, torch.stack([val(to_tensor(im)) for im in images]),
                               atol=1e-6, rtol=0)


def test_hps_score_is_open_clip_forward_through_the_checkpoint(tiny_hps):
    import open_clip

    reward = hps_reward(tiny_hps)
    images = smooth_images(3, 48, 40, seed=3)
    model, _, val = open_clip.create_model_and_transforms("TinyHPS", pretrained=tiny_hps[0],
                                                          output_dict=True)
    model.eval()
    with torch.no_grad():
        out = model(torch.stack([val(im) for im in images]),
                    open_clip.get_tokenizer("TinyHPS")(PROMPTS))
    expected = (out["image_features"] @ out["text_features"].T).diagonal()  # HPS's score
    got = reward(images, PROMPTS)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert got[0] != got[2]  # same prompt, other image
    # A batch scores as its images one by one.
    one = torch.cat([reward(images[i : i + 1], PROMPTS[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(got, one, atol=1e-6, rtol=0)


def test_hps_checkpoint_is_read_once_for_many_calls(tiny_hps, monkeypatch):
    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a[0]) or real_load(*a, **k))
    reward = rewards.load_rewards("hps", "cpu", hps_checkpoint=tiny_hps[0],
                                  hps_model=tiny_hps[1])["hps"]
    for seed in range(5):
        reward(smooth_images(4, 32, 32, seed), ["a cat"] * 4)
    assert loads == [tiny_hps[0]]


def test_hps_checkpoint_from_the_hugging_face_cache_and_missing_ones_named(tiny_hps, tmp_path,
                                                                          monkeypatch):
    import huggingface_hub

    in_hub_cache(tmp_path / "hub", "org/hps", {"HPS_v2.1_compressed.pt": tiny_hps[0]})
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    reward = rewards.OpenClipReward.hps("org/hps/HPS_v2.1_compressed.pt", "cpu", tiny_hps[1])
    torch.testing.assert_close(reward(smooth_images(3, 32, 32), PROMPTS),
                               hps_reward(tiny_hps)(smooth_images(3, 32, 32),
                                                                     PROMPTS))
    with pytest.raises(rewards.RewardModelError,
                       match="hf download org/other HPS_v2.1_compressed.pt"):
        rewards.OpenClipReward.hps("org/other/HPS_v2.1_compressed.pt", "cpu", tiny_hps[1])
    with pytest.raises(rewards.RewardModelError, match="--hps-checkpoint: no file"):
        rewards.OpenClipReward.hps(str(tmp_path / "nowhere.pt"), "cpu", tiny_hps[1])
    with pytest.raises(ValueError, match="not an OpenCLIP architecture"):
        rewards.OpenClipReward.hps(tiny_hps[0], "cpu", "ViT-Q-99")


def test_a_checkpoint_of_another_architecture_is_refused(tiny_hps, tmp_path):
    other = {**TINY_OPEN_CLIP, "embed_dim": 8}
    (tmp_path / "OtherArch.json").write_text(json.dumps(other))
    with pytest.raises(rewards.RewardModelError, match="is not an HPS checkpoint for OpenCLIP"):
        rewards.OpenClipReward.hps(tiny_hps[0], "cpu", str(tmp_path / "OtherArch.json"))


def test_open_clip_clip_from_a_folder_and_from_the_hub_cache(tmp_path, monkeypatch):
    import huggingface_hub
    import open_clip

    folder = make_tiny_open_clip(tmp_path / "dfn")
    images = smooth_images(3, 40, 56, seed=4)
    model, val = open_clip.create_model_from_pretrained(f"local-dir:{folder}")
    model.eval()
    with torch.no_grad():  # the official script's CLIP score: normalised features, dot product
        i = torch.nn.functional.normalize(model.encode_image(torch.stack([val(x) for x in images])),
                                          dim=-1)
        t = torch.nn.functional.normalize(
            model.encode_text(open_clip.get_tokenizer(f"local-dir:{folder}")(PROMPTS)), dim=-1)
    expected = (i * t).sum(-1)
    for spec in (folder, f"local-dir:{folder}"):
        reward = rewards.load_rewards("clip", "cpu", clip_model=spec)["clip"]
        assert isinstance(reward, rewards.OpenClipReward) and reward.resize_mode == "squash"
        torch.testing.assert_close(reward(images, PROMPTS), expected, atol=1e-6, rtol=0)
    # The same files as a Hub repo already in the cache: 'hf-hub:org/name'.
    in_hub_cache(tmp_path / "hub", "apple/tiny-dfn", {f.name: f for f in Path(folder).iterdir()})
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    reward = rewards.load_rewards("clip", "cpu", clip_model="hf-hub:apple/tiny-dfn")["clip"]
    torch.testing.assert_close(reward(images, PROMPTS), expected, atol=1e-6, rtol=0)
    with pytest.raises(rewards.RewardModelError, match="hf download apple/not-cached"):
        rewards.load_rewards("clip", "cpu", clip_model="hf-hub:apple/not-cached")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "open_clip_config.json").write_text("{}")
    with pytest.raises(rewards.RewardModelError, match="no weights in"):
        rewards.load_rewards("clip", "cpu", clip_model=f"local-dir:{tmp_path / 'empty'}")


def test_rewards_refuse_bad_input(tiny_hps):
    reward = hps_reward(tiny_hps)
    good = smooth_images(2, 32, 32)
    for images, prompts, match in [
            (good[0], ["a", "b"], r"\(B, 3, H, W\)"), (good[:, :1], ["a", "b"], r"\(B, 3, H, W\)"),
            (good, ["a"], "2 images but 1 prompts"), (good * 2, ["a", "b"], r"in \[0, 1\]"),
            (good.clone().fill_(float("nan")), ["a", "b"], "NaN")]:
        with pytest.raises(ValueError, match=match):
            reward(images, prompts)
    with pytest.raises(ValueError, match="listed twice"):
        rewards.reward_names("hps,clip,hps")
    with pytest.raises(ValueError, match="--eval-rewards: unknown reward 'imagereward'"):
        rewards.reward_names("clip,imagereward", "--eval-rewards")


@pytest.mark.parametrize("size", [(24, 40), (40, 24), (768, 1024)], ids=str)
def test_clip_preprocessing_is_clip_image_processors_on_non_square_images(tiny_clip, tmp_path,
                                                                         size):
    """transformers' CLIP / PickScore rewards preprocess tensors as CLIPImageProcessor does
    (the shorter side resized, the longer one truncated, centre crop): within 1/255 of a pixel,
    the processor's own uint8 rounding."""
    import shutil

    from transformers import CLIPImageProcessor

    folder = tmp_path / "clip"
    shutil.copytree(tiny_clip, folder)
    if size[0] > 100:  # the released processors' 224
        CLIPImageProcessor(size={"shortest_edge": 224},
                           crop_size={"height": 224, "width": 224}).save_pretrained(folder)
    reward = rewards.ClipReward(str(folder))
    images = (smooth_images(2, *size, seed=3) * 255).round() / 255
    ours = reward.preprocess(images)
    theirs = CLIPImageProcessor.from_pretrained(folder)(
        images=list((images * 255).round().to(torch.uint8)), return_tensors="pt").pixel_values
    assert ours.shape == theirs.shape
    pixels = lambda x: x * reward.std + reward.mean
    assert (pixels(ours) - pixels(theirs)).abs().max() <= 1 / 255 + 1e-6


def test_the_dfn5b_ids_the_pages_and_help_name_are_open_clips(capsys):
    """The official CLIP score's model, as the pages, --help and the rewards' docstring name it,
    is an id open_clip's table of pretrained models lists (not the legacy -384 name)."""
    import re

    import open_clip

    from image_flow import flags

    listed = {open_clip.get_pretrained_cfg(m, t).get("hf_hub", "").strip("/")
              for m, t in open_clip.list_pretrained() if t.startswith("dfn5b")}
    root = Path(__file__).resolve().parents[1]
    with pytest.raises(SystemExit):
        flags.parse_args(["--help"])
    texts = [capsys.readouterr().out, rewards.__doc__, (root / "README.md").read_text(),
             *[p.read_text() for p in (root / "docs").glob("*.md")]]
    named = {m for text in texts for m in re.findall(r"apple/DFN5B-CLIP-ViT-H-14[\w-]*", text)}
    assert named and named <= listed, named - listed


def test_the_memory_plan_counts_openclip_and_hps_rewards_from_their_configs(tiny_hps, tmp_path):
    """--plan's reward rows: an OpenCLIP CLIP from its open_clip_config.json and HPS from its
    architecture, built on the meta device, count what the loaded models hold."""
    import argparse

    from image_flow import plan

    folder = make_tiny_open_clip(tmp_path / "clip")
    args = argparse.Namespace(clip_model=str(folder), hps_model=tiny_hps[1])
    loaded = rewards.load_rewards("clip,hps", clip_model=str(folder),
                                  hps_checkpoint=tiny_hps[0], hps_model=tiny_hps[1])
    for name in ("clip", "hps"):
        assert plan.reward_parameters(name, args) == sum(
            p.numel() for p in loaded[name].model.parameters())
