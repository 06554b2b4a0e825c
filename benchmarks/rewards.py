"""Benchmark: what scoring costs, per reward and batch size, and what reloading HPS per image cost.

    python -m benchmarks.rewards                 # tiny reward models, then full-size HPS-v2.1
    python -m benchmarks.rewards --no-full-size  # tiny models only (seconds)

1. Images per second of each reward (image_flow/rewards.py) at batch 1, 16 and 64, on tiny
   random models of each kind (transformers CLIP / PickScore, OpenCLIP CLIP with DFN5B's
   preprocessing, HPS-v2.1's OpenCLIP), scoring 512² images as FLUX at 512² decodes them. Tiny
   models measure the preprocessing and the per-call overhead, not a full-size model's
   arithmetic.
2. The same HPS reward scored the way hpsv2 1.2.0's `score()` does it, once per image and reading
   the checkpoint (torch.load + load_state_dict) at every call.
3. (full size) One read of an HPS-format checkpoint of OpenCLIP ViT-H-14 (the HPS-v2.1 model, random
   weights, float32, written to a temporary file), and ViT-H-14 scoring at batch 1 and 8: what
   hpsv2's per-image reload cost beside the scoring itself. The file is read right after it was
   written (page cache warm): a cold read from a network file system costs more.

Every figure comes from this run; docs/rewards.md records them with the machine.
"""

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch

import g2rpo
from image_flow import rewards
from image_flow.tiny import make_tiny_clip, make_tiny_hps, make_tiny_open_clip


def timed(fn, repeats):
    """Median seconds of `repeats` calls (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def images_and_prompts(n, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g), [f"prompt {i % 4}" for i in range(n)]


def tiny_rewards(folder):
    """The four reward kinds on tiny random models, saved and loaded back as users' files are."""

    clip = make_tiny_clip(folder / "clip")
    hps, arch = make_tiny_hps(folder / "hps")
    return hps, arch, {
        "clip (transformers)": rewards.ClipReward(clip),
        "pickscore": rewards.ClipReward(clip, pickscore=True),
        "clip (OpenCLIP, DFN5B preprocessing)": rewards.OpenClipReward.pretrained(
            make_tiny_open_clip(folder / "dfn")),
        "hps": rewards.OpenClipReward.hps(hps, "cpu", arch)}


def per_image_reload(checkpoint, arch):
    """hpsv2 1.2.0's score(): the checkpoint read into the model at every call, one image each."""
    import open_clip

    name = rewards.open_clip_architecture(arch)
    reward = rewards.OpenClipReward(open_clip.create_model(name), open_clip.get_tokenizer(name))

    def score(images, prompts):
        out = []
        for img, p in zip(images, prompts):
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
            reward.model.load_state_dict(state)
            out.append(reward(img[None], [p]))
        return torch.cat(out)

    return score


def full_size(batches, repeats, log):
    """One HPS-format ViT-H-14 checkpoint read, and ViT-H-14 scoring at the given batch sizes."""
    import open_clip

    t = time.perf_counter()
    torch.manual_seed(0)
    model = open_clip.create_model(rewards.HPS_ARCHITECTURE).eval()
    params = sum(p.numel() for p in model.parameters())
    log(f"ViT-H-14 ({params / 1e6:.0f} M parameters) built in {time.perf_counter() - t:.1f} s")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "hps.pt"
        torch.save({"state_dict": model.state_dict()}, path)
        gb = path.stat().st_size / 1e9

        def load():
            state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
            model.load_state_dict(state)

        load_s = timed(load, repeats)
        log(f"one checkpoint read ({gb:.2f} GB, float32; torch.load + load_state_dict): "
            f"{load_s:.2f} s (median of {repeats})")
    reward = rewards.OpenClipReward(model, open_clip.get_tokenizer(rewards.HPS_ARCHITECTURE))
    per_image = {}
    for b in batches:
        images, prompts = images_and_prompts(b, 512)
        per_image[b] = timed(lambda: reward(images, prompts), 1) / b
        log(f"ViT-H-14 scoring, batch {b:>2}: {1 / per_image[b]:6.2f} images/s "
            f"({per_image[b]:.2f} s per image)")
    return load_s, per_image


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.rewards",
                                description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--batches", default="1,16,64", help="comma-separated batch sizes")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per figure (median)")
    p.add_argument("--full-size-batches", default="1,8",
                   help="batch sizes of the full-size ViT-H-14 scoring")
    p.add_argument("--no-full-size", action="store_true",
                   help="skip the full-size ViT-H-14 checkpoint read and scoring")
    args = p.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    torch.set_num_threads(os.cpu_count() or 1)
    start = time.perf_counter()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; images 512², "
          f"4 distinct prompts per batch")
    with tempfile.TemporaryDirectory() as tmp:
        hps, arch, models = tiny_rewards(Path(tmp))
        print(f"\n{'reward (tiny random model)':<40}" + "".join(f"{'batch ' + str(b):>12}"
                                                                for b in batches) + "   images/s")
        rows = dict(models)
        rows["hps, checkpoint read per image (hpsv2)"] = per_image_reload(hps, arch)
        for name, reward in rows.items():
            rates = []
            for b in batches:
                images, prompts = images_and_prompts(b, 512)
                rates.append(b / timed(lambda: reward(images, prompts), args.repeats))
            print(f"{name:<40}" + "".join(f"{r:12.1f}" for r in rates))
    if not args.no_full_size:
        print("\nfull size: HPS-v2.1's architecture, OpenCLIP ViT-H-14 (random weights)")
        load_s, per_image = full_size([int(b) for b in args.full_size_batches.split(",")],
                                      args.repeats, print)
        cfg = g2rpo.Config()  # the official recipe's K branch steps, L granularities, G members
        n = len(cfg.branch_steps) * len(cfg.granularities) * cfg.group_size + 1  # + the anchor
        best = min(per_image.values())
        print(f"the official recipe scores {n} images per prompt and iteration: a checkpoint read "
              f"per image adds {n * load_s:.0f} s to {n * best:.0f} s of scoring on this machine "
              f"({load_s / best:.1f}× the scoring itself)")
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
