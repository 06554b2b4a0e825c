"""The image trainer on a tiny random FLUX.1, offline: FluxPipeline as the oracle, then training,
resume, checkpoints, exports, processes and bad input.

Every model is built from a config with random weights (image_flow/tiny.py), saved with
save_pretrained into a temporary folder and loaded back through the trainer's real loading path
(FluxPipeline.from_pretrained).
"""

import importlib.util
import json
import math
import multiprocessing.forkserver
import os
import re
import runpy
import signal
import subprocess
import sys
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest
import torch

import g2rpo
from image_flow import attention, checkpoints, flags, loading, parallel, rewards, runs, trainer
from image_flow.prompts import PromptEncoder
from image_flow.tiny import make_tiny_flux
from image_flow.velocity import Velocity

H = W = 32  # tiny VAE with the real 8× downsampling: 32×32 images, 2×2 = 4 packed tokens
ROOT = Path(__file__).resolve().parents[1]  # the repository: `python -m image_flow` runs there
# The environment of a trainer started in a subprocess (any working directory).
SUBPROCESS_ENV = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


def train_args(flux, clip, out, *extra):
    return ["--model", flux, "--clip-model", clip, "--rewards", "clip", "--height", str(H),
            "--width", str(W), "--steps", "5", "--group-size", "3", "--branch-steps", "0,1",
            "--granularities", "1,2", "--max-sequence-length", "16", "--clip-range", "0.05",
            "--output-dir", str(out), "--batch-size", "64", "--lr", "1e-3",
            "--eval-steps", "4", *extra]


# ----------------------------------------------------------------------------------------------
# Our loop is FLUX's loop.


@pytest.mark.parametrize("guidance_embeds", [True, False])
@pytest.mark.parametrize("dynamic_shift", [True, False])
def test_eta_zero_sampler_equals_flux_pipeline(tmp_path, guidance_embeds, dynamic_shift):
    pipe = loading.load_pipeline(make_tiny_flux(tmp_path, guidance_embeds, dynamic_shift))
    prompts = ["a red fox", "a lighthouse"]
    kw = dict(height=H, width=W, num_inference_steps=5, guidance_scale=3.5, max_sequence_length=16)
    ref_latents = pipe(prompts, generator=torch.Generator().manual_seed(0), output_type="latent",
                       **kw).images
    ref_images = pipe(prompts, generator=torch.Generator().manual_seed(0), output_type="pt",
                      **kw).images
    sigmas = trainer.sigma_grid(pipe, 5, H, W, schedule="pipeline")
    velocity = Velocity.from_pipe(pipe.transformer, pipe, H, W, guidance=3.5)
    latents, images = trainer.sample(pipe, velocity, PromptEncoder(pipe, 16), prompts,
                                     H, W, sigmas, torch.Generator().manual_seed(0))
    torch.testing.assert_close(latents, ref_latents)
    torch.testing.assert_close(images, ref_images)
    assert latents.abs().max() > 0 and images.std() > 0  # not a trivial match


def test_evaluation_in_batches_equals_one_call(tiny_flux):
    # More evaluation prompts than the batch (5 prompts, 2 per transformer call, 3 per decode
    # and reward call): the same noise, latents, images and scores as all of them at once.
    pipe = loading.load_pipeline(tiny_flux)
    prompts = ["a red fox", "a lighthouse", "a bowl of ramen", "a corgi", "a crane"]
    sigmas = trainer.sigma_grid(pipe, 4, H, W, schedule="pipeline")
    velocity = Velocity.from_pipe(pipe.transformer, pipe, H, W, guidance=3.5)
    encoder = PromptEncoder(pipe, 16)
    calls = []
    rewards = {"bright": lambda img, p: (calls.append(len(p)), img.mean((1, 2, 3)))[1]}
    whole = trainer.evaluate(pipe, velocity, encoder, rewards, prompts, H, W, sigmas, (0, 1))
    assert calls == [5, 5]
    calls.clear()
    batched = trainer.evaluate(pipe, velocity, encoder, rewards, prompts, H, W, sigmas, (0, 1),
                               batch=2, decode_batch=3)
    assert calls == [3, 2, 3, 2]
    torch.testing.assert_close(batched[1], whole[1], rtol=1e-5, atol=1e-6)
    assert batched[0]["bright"] == pytest.approx(whole[0]["bright"], rel=1e-6)


def test_static_schedule_is_the_official_grid(tiny_flux):
    pipe = loading.load_pipeline(tiny_flux)
    for m in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.transformer):
        assert not m.training and not any(p.requires_grad for p in m.parameters())
    torch.testing.assert_close(trainer.sigma_grid(pipe, 16, H, W, "static", 3.0),
                               g2rpo.sigma_schedule(16, 3.0))
    with pytest.raises(ValueError, match="'cosine'"):
        trainer.sigma_grid(pipe, 16, H, W, "cosine")


def test_prompt_encoder_caches_and_matches_encode_prompt(tiny_flux):
    pipe = loading.load_pipeline(tiny_flux)
    enc = PromptEncoder(pipe, 16)
    embeds, pooled = enc(["a cat", "a dog", "a cat"])
    ref_e, ref_p, _ = pipe.encode_prompt(["a cat", "a dog"], None, max_sequence_length=16)
    torch.testing.assert_close(embeds, ref_e[[0, 1, 0]])
    torch.testing.assert_close(pooled, ref_p[[0, 1, 0]])
    assert set(enc.store) == {"a cat", "a dog"}


def test_the_prompt_cache_on_disk_is_read_back_bit_exact_and_keyed(tiny_flux, tmp_path,
                                                                   monkeypatch):
    from image_flow.prompts import DiskStore, encode_up_front, release_text_encoders

    pipe = loading.load_pipeline(tiny_flux)
    fresh = PromptEncoder(pipe, 16)(["a cat", "a dog"])  # in memory
    store = DiskStore(tmp_path / "cache", {"model": "tiny", "max_sequence_length": 16})
    enc = PromptEncoder(pipe, 16, negative_prompt="blurry", store=store)
    assert encode_up_front(enc, ["a cat", "a dog", "a cat"], progress=False) == 3  # + negative
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 3
    assert not list((tmp_path / "cache").rglob("*.tmp"))  # written whole, then renamed
    # Another process (a resumed run) reads them back without its text encoders, which are
    # gone from memory, not only from the pipeline.
    import weakref

    alive = [weakref.ref(pipe.text_encoder), weakref.ref(pipe.text_encoder_2)]
    release_text_encoders(pipe)
    assert pipe.text_encoder is None and pipe.text_encoder_2 is None
    assert [ref() for ref in alive] == [None, None]
    again = PromptEncoder(pipe, 16, negative_prompt="blurry", store=DiskStore(
        tmp_path / "cache", {"model": "tiny", "max_sequence_length": 16}))
    assert encode_up_front(again, ["a cat", "a dog"], progress=False) == 0
    rows = again(["a cat", "a dog"])
    for a, b in zip(rows["cond"], fresh):
        assert torch.equal(a, b)
    # Another text length is another key: not found, and the encoders are gone.
    other = PromptEncoder(pipe, 8, store=DiskStore(tmp_path / "cache",
                                                   {"model": "tiny", "max_sequence_length": 8}))
    with pytest.raises(RuntimeError, match="'a cat' was not encoded before training"):
        other(["a cat"])


def damage(path, how, other=None):
    """Damage a cache entry as disks and people do."""
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "zeroed":  # the last 200 bytes of tensor data
        path.write_bytes(data[:-200] + bytes(200))
    elif how == "swapped":  # another prompt's entry under this one's name
        path.write_bytes(other.read_bytes())
    elif how == "unreplaceable":  # neither readable nor removable: a folder in its place
        path.unlink()
        path.mkdir()
        (path / "x").write_text("x")


@pytest.mark.parametrize("how", ["truncated", "empty", "zeroed", "swapped", "unreplaceable"])
def test_a_damaged_prompt_cache_entry_is_encoded_again_or_refused_at_set_up(tiny_flux, tmp_path,
                                                                            how):
    from image_flow.prompts import CacheError, DiskStore, encode_up_front

    pipe = loading.load_pipeline(tiny_flux)
    fresh = PromptEncoder(pipe, 16)(["a cat", "a dog"])
    store = DiskStore(tmp_path / "cache", {"model": "tiny"})
    enc = PromptEncoder(pipe, 16, store=store)
    assert encode_up_front(enc, ["a cat", "a dog"], progress=False) == 2
    damage(store.path("a cat"), how, other=store.path("a dog"))
    said = []
    if how == "unreplaceable":  # a set-up error naming the file, the prompt and the remedy
        with pytest.raises(CacheError, match=re.escape(
                f"entry {str(store.path('a cat'))!r} for 'a cat' cannot be read") + ".*and cannot "
                "be replaced .*delete it or fix its permissions, or give another --prompt-cache"):
            encode_up_front(enc, ["a cat", "a dog"], progress=False, log=said.append)
        return
    reason = {"truncated": "cannot be read", "empty": "cannot be read",
              "zeroed": "does not match its SHA-256", "swapped": "holds the prompt 'a dog'"}[how]
    assert reason in store.problem("a cat")
    with pytest.raises(CacheError, match=reason):  # read directly: refused, never wrong rows
        store["a cat"]
    assert encode_up_front(enc, ["a cat", "a dog"], progress=False, log=said.append) == 1
    assert len(said) == 1 and "'a cat'" in said[0] and reason in said[0]
    assert "removed and encoded again" in said[0]
    rows = enc(["a cat", "a dog"])
    for a, b in zip(rows, fresh):
        assert torch.equal(a, b)


def test_prompt_cache_entries_are_synced_take_the_umask_and_are_keyed_by_content(
        tiny_flux, tmp_path, monkeypatch):
    import shutil

    import diffusers

    from image_flow.prompts import DiskStore, encode_up_front, library_versions, \
        text_encoder_identity

    synced = []
    fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), fsync(fd)))
    pipe = loading.load_pipeline(tiny_flux)

    def store_for(folder):
        return DiskStore(tmp_path / "cache", {"text_encoders": text_encoder_identity(folder),
                                              **library_versions()})

    umask = os.umask(0o022)
    try:
        enc = PromptEncoder(pipe, 16, store=store_for(tiny_flux))
        assert encode_up_front(enc, ["a cat"], progress=False) == 1
    finally:
        os.umask(umask)
    entry = enc.store.path("a cat")
    assert entry.stat().st_mode & 0o777 == 0o644  # readable by the other accounts sharing it
    assert len(synced) >= 2  # the file before its rename, and its folder after
    # The same checkpoint copied elsewhere finds the same entries; a library upgrade does not.
    moved = shutil.copytree(tiny_flux, tmp_path / "elsewhere" / "flux")
    assert store_for(moved).folder == enc.store.folder
    assert encode_up_front(PromptEncoder(pipe, 16, store=store_for(moved)), ["a cat"],
                           progress=False) == 0
    monkeypatch.setattr(diffusers, "__version__", "99.0.0")
    upgraded = store_for(moved)
    assert upgraded.folder != enc.store.folder and "a cat" not in upgraded
    # Another text encoder (its weights differ, same names and sizes) is another folder.
    weights = next((Path(moved) / "text_encoder_2").glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert store_for(moved).folder != upgraded.folder


def test_the_prompt_cache_is_listed_pruned_and_checked_for_room(tiny_flux, tmp_path, capsys,
                                                                monkeypatch):
    import shutil as sh

    from image_flow import prompts

    pipe = loading.load_pipeline(tiny_flux)
    old = prompts.DiskStore(tmp_path / "cache", {"model": "old"}, checkpoint="/models/old")
    new = prompts.DiskStore(tmp_path / "cache", {"model": "new"}, checkpoint="/models/new")
    for store in (old, new):
        prompts.encode_up_front(PromptEncoder(pipe, 16, store=store), ["a cat", "a dog"],
                                progress=False)
    month = time.time() - 31 * 86400
    os.utime(old.folder / prompts.IDENTITY, (month, month))
    prompts.main(["--prompt-cache", str(tmp_path / "cache")])
    out = capsys.readouterr().out
    assert out.count("2 prompts") == 2 and "/models/old" in out and "last used 31.0 days" in out
    prompts.main(["--prompt-cache", str(tmp_path / "cache"), "--prune", "30"])
    assert "(pruned)" in capsys.readouterr().out
    assert not old.folder.exists() and "a cat" in new
    # Too little room for the prompts to encode: refused before encoding them, with the figures.
    monkeypatch.setattr(sh, "disk_usage", lambda p: sh._ntuple_diskusage(10**9, 10**9, 1000))
    store = prompts.DiskStore(tmp_path / "cache", {"model": "third"})
    with pytest.raises(OSError, match=r"3 of 3 prompts to encode need about .* GB more .* and the "
                                      r"disk has 0.00 GB free; free some \(python -m "
                                      r"image_flow.prompts --prune DAYS\)"):
        prompts.encode_up_front(PromptEncoder(pipe, 16, store=store), ["a", "b", "c"],
                                progress=False)


def test_ranks_that_do_not_share_a_cache_folder_each_encode_what_they_lack(tiny_flux, tiny_clip,
                                                                          tmp_path):
    # Two processes, each with its own cache folder (node-local caches): after the split each
    # lacks the other's half, encodes it before the text encoders go, and training runs.
    script = tmp_path / "own_cache.py"
    args = train_args(tiny_flux, tiny_clip, tmp_path / "run", "--iterations", "1",
                      "--lora-rank", "4")
    script.write_text(f"""
import os, sys
sys.path.insert(0, {str(ROOT)!r})
os.environ["G2RPO_PROMPT_CACHE"] = os.path.join({str(tmp_path)!r}, "cache" + os.environ["RANK"])
from image_flow import trainer
sys.argv = ["image_flow", *{args!r}]
trainer.cli()
""")
    stdout = two_processes(str(script), tmp_path)
    assert "rank 0: 10 of the 20 prompts were not in this process's view" in stdout
    assert "rank 1: 10 of the 20 prompts were not in this process's view" in stdout
    for rank in (0, 1):
        assert len(list((tmp_path / f"cache{rank}").rglob("*.safetensors"))) == 20
    sums = json.loads((tmp_path / "run" / "rank_checksums.json").read_text())
    assert len(sums) == 2 and sums[0] == sums[1]


def test_prompts_are_encoded_up_front_and_freeing_the_text_encoders_changes_no_weight(
        tiny_flux, tiny_clip, tmp_path, monkeypatch, capsys):
    """Every prompt (training, evaluation, the negative one) is encoded before training, the
    text encoders are then gone from the pipeline, and training equals, bit for bit, a run that
    encodes lazily in memory and keeps them; a second run reads the cache instead of encoding."""
    from image_flow import prompts

    kept = []
    describe = trainer.describe
    monkeypatch.setattr(trainer, "describe",
                        lambda r: (kept.append(prompts.text_encoders(r.pipe)), describe(r)))
    args = lambda out: train_args(tiny_flux, tiny_clip, tmp_path / out, "--iterations", "2",
                                  "--lora-rank", "4", "--true-cfg", "2", "--negative-prompt",
                                  "blurry", "--prompt-cache", str(tmp_path / "cache"), "--eval")
    cold, cold_evals = trainer.main(args("cold"))
    assert "prompts: 21 encoded" in capsys.readouterr().out  # 16 + 4 held out + the negative
    warm, warm_evals = trainer.main(args("warm"))
    assert "prompts: 0 encoded" in capsys.readouterr().out
    assert kept[0] == kept[1] == {}  # no text encoder left once training starts
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 21
    # Lazily, in memory, with the text encoders kept: the behaviour before the cache existed.
    monkeypatch.setattr(trainer, "encode_prompts", lambda r: PromptEncoder(
        r.pipe, r.args.max_sequence_length, r.args.negative_prompt))
    lazy, lazy_evals = trainer.main(args("lazy"))
    assert set(kept[2]) == {"text_encoder", "text_encoder_2"}
    for key in ("reward", "loss", "grad_norm"):
        assert [m[key] for m in cold] == [m[key] for m in warm] == [m[key] for m in lazy]
    assert cold_evals == warm_evals == lazy_evals
    weights = [checkpoint(tmp_path / out / "checkpoint")["model"] for out in ("cold", "lazy")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


@pytest.mark.parametrize("lora_rank", ["4", "0"], ids=["lora", "full"])
def test_the_memory_plan_is_what_training_holds(tiny_flux, tiny_clip, tmp_path, monkeypatch,
                                                lora_rank):
    """--plan's figures, from the configs on the meta device, against the bytes of the tensors a
    run really holds (float32 on the CPU): weights, AdamW's moments, the EMA, the KL reference,
    the VAE, the text encoders before they are freed, the reward."""
    from image_flow import plan as planning, prompts

    argv = train_args(tiny_flux, tiny_clip, tmp_path, "--iterations", "1", "--lora-rank",
                      lora_rank, "--kl-beta", "0.1", "--ema-decay", "0.5", "--dtype", "fp32")
    planned = {what: b for what, b, _ in planning.plan(flags.parse_args(argv), 1, dtype_bytes=4)}
    held = lambda tensors: sum(t.numel() * t.element_size() for t in tensors)
    encoders = prompts.text_encoders(loading.load_pipeline(tiny_flux))
    seen = []
    describe = trainer.describe
    monkeypatch.setattr(trainer, "describe", lambda r: (seen.append(r), describe(r)))
    trainer.main(argv)
    r = seen[0]
    trained = [p for p in r.raw.parameters() if p.requires_grad]
    if lora_rank == "4":
        assert planned["transformer, frozen"] == held(p for p in r.raw.parameters()
                                                      if not p.requires_grad)
        assert planned["LoRA adapters"] == held(trained)
        assert "KL reference" not in planned  # the adapters switched off
    else:
        assert planned["transformer, trained"] == held(trained) == held(r.raw.parameters())
        assert planned["KL reference"] == held(r.reference.parameters())
    moments = [t for state in r.optimizer.state.values() for t in state.values() if t.dim()]
    assert planned["AdamW moments"] == held(moments) > 0
    assert planned["gradients"] == held(trained)
    assert planned["EMA"] == held(r.ema.averages)
    assert planned["VAE"] == held(r.pipe.vae.parameters())
    for name, module in encoders.items():
        assert planned[f"{name} (while encoding)"] == held(module.parameters())
    assert planned["reward clip"] == held(r.rewards["clip"].model.parameters())
    assert prompts.text_encoders(r.pipe) == {}
    # One prompt's rows as the cache holds them; the cache's total for the 20 prompts.
    row = r.encoder.store.read_checked(r.prompts[0])
    assert planned["prompt embeddings (host)"] == held(row) * r.args.batch_size
    assert planned["prompt cache (disk)"] == held(row) * 20  # 16 prompts, 4 held out
    # The VAE decode's peak, measured on the meta device, is what a real decode's tensors reach.
    x = torch.randn(r.args.decode_batch, *trainer.latent_shape(r.pipe, H, W))
    with torch.no_grad(), planning.LiveBytes() as real:
        r.family.decode(r.pipe, x, H, W)
    assert planned["VAE decode (activations)"] == real.peak > 0
    # Loading holds about one tensor at a time on the host: the largest of the models'.
    largest = max(w.numel() * w.element_size() for m in (r.pipe.transformer, r.pipe.vae,
                                                        *encoders.values())
                  for w in m.parameters())
    assert planned["loading (host)"] == largest


def test_clip_reward_is_clip_models_cosine(tiny_clip):
    from transformers import CLIPModel

    reward = rewards.ClipReward(tiny_clip)
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    prompts = ["a cat", "a dog", "sun"]
    model = CLIPModel.from_pretrained(tiny_clip).eval()
    tok = reward.tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt")
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    with torch.no_grad():
        out = model(input_ids=tok.input_ids, attention_mask=tok.attention_mask,
                    pixel_values=(images - mean) / std)
    expected = out.logits_per_image.diagonal() / model.logit_scale.exp()
    torch.testing.assert_close(reward(images, prompts), expected)
    pick = rewards.ClipReward(tiny_clip, pickscore=True)
    torch.testing.assert_close(pick(images, prompts), out.logits_per_image.diagonal() / 100)


# ----------------------------------------------------------------------------------------------
# Attention backends: cuDNN attention stays out of the transformer (its bf16 backward fails on
# Hopper GPUs). torch's flags are readable on a CPU, so the choice is checked here.


def tiny_inputs(pipe, n=2):
    g = torch.Generator().manual_seed(3)
    S, C = trainer.latent_shape(pipe, H, W)
    cond = PromptEncoder(pipe, 16)(["a cat", "a dog"][:n])
    return torch.randn(n, S, C, generator=g), torch.full((n,), 0.7), cond


def test_transformer_forward_runs_without_cudnn_attention_and_restores_the_flags(tiny_flux):
    pipe = loading.load_pipeline(tiny_flux)
    seen = []
    pipe.transformer.register_forward_pre_hook(
        lambda m, a: seen.append(attention.enabled_backends()))
    before = attention.enabled_backends()
    assert "cudnn" in before  # PyTorch's default: the test would catch a missing context
    x, sigma, cond = tiny_inputs(pipe)
    v = Velocity.from_pipe(pipe.transformer, pipe, H, W)(x, sigma, cond)
    assert seen == [("flash", "efficient", "math")]
    assert attention.enabled_backends() == before  # VAE, rewards, the caller: untouched
    v_all = Velocity.from_pipe(pipe.transformer, pipe, H, W,
                               attention="all")(x, sigma, cond)
    assert seen[-1] == before
    torch.testing.assert_close(v, v_all)  # same values on a CPU: only the kernel choice differs
    Velocity.from_pipe(pipe.transformer, pipe, H, W, attention="math")(x, sigma, cond)
    assert seen[-1] == ("math",)


def test_gradient_checkpointing_recomputes_under_the_same_attention_backends(tiny_flux):
    pipe = loading.load_pipeline(tiny_flux)
    trainer.setup_trainable(pipe.transformer, 2, 2, gradient_checkpointing=True)
    seen = []
    block = pipe.transformer.transformer_blocks[0]
    block.register_forward_pre_hook(lambda m, a: seen.append(torch.backends.cuda.cudnn_sdp_enabled()))
    x, sigma, cond = tiny_inputs(pipe)
    v = Velocity.from_pipe(pipe.transformer, pipe, H, W)(x, sigma, cond)
    assert seen == [False]
    v.square().mean().backward()  # outside Velocity's context: the recomputation runs here
    assert seen == [False, False]  # forward, then its recomputation in backward
    assert torch.backends.cuda.cudnn_sdp_enabled()


@pytest.mark.parametrize("spec,expected", [("all", None), ("math", ("math",)),
                                           ("flash, math,flash", ("flash", "math"))])
def test_attention_backend_names(spec, expected):
    assert attention.sdpa_backends(spec) == expected
    with pytest.raises(ValueError, match="unknown attention backend 'cudnn2'"):
        attention.sdpa_backends("flash,cudnn2")
    with pytest.raises(ValueError, match="at least one"):
        attention.sdpa_backends(" , ")


# ----------------------------------------------------------------------------------------------
# Training, checkpoints, resume.


def checkpoint(path):
    """A checkpoint directory read whole into one process (DCP's own converter): model,
    optimizer, rng by rank, and g2rpo.json's iteration, world_size and fingerprint."""
    import tempfile
    import warnings

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to load in a single process"
        dcp_to_torch_save(path, Path(tmp) / "whole.pt")
        state = torch.load(Path(tmp) / "whole.pt", weights_only=False)
    return {**state, **json.loads((Path(path) / "g2rpo.json").read_text())}


@pytest.mark.parametrize("lora,dtype", [(True, "fp32"), (False, "fp32"), (True, "bf16")])
def test_one_iteration_gives_finite_metrics_and_changes_the_weights(tiny_flux, tiny_clip,
                                                                    tmp_path, lora, dtype):
    extra = ["--lora-rank", "4" if lora else "0", "--dtype", dtype]
    history, _ = trainer.main(train_args(tiny_flux, tiny_clip, tmp_path, "--iterations", "1",
                                         *extra))
    m = history[0]
    for k in ("reward", "reward_std", "loss", "clip_frac", "approx_kl", "grad_norm"):
        assert torch.isfinite(torch.tensor(m[k])), (k, m[k])
    assert m["ratio_dev_first"] < (1e-5 if dtype == "fp32" else 1e-2)
    saved = checkpoint(tmp_path / "checkpoint")["model"]
    original = loading.load_pipeline(tiny_flux).transformer.state_dict()
    if lora:
        assert saved and all("lora" in k for k in saved)
        assert any(v.abs().max() > 0 for k, v in saved.items() if "lora_B" in k)  # B starts at 0
    else:
        assert set(saved) == set(original)
        assert any(not torch.equal(saved[k], original[k]) for k in saved)


def without(argv, *flags):
    """argv without these flags and their values."""
    out = list(argv)
    for flag in flags:
        i = out.index(flag)
        del out[i : i + 2]
    return out


def test_the_sde_kind_trains_and_belongs_to_the_fingerprint(tiny_flux, tiny_clip, tmp_path,
                                                             capsys):
    args = train_args(tiny_flux, tiny_clip, tmp_path, "--iterations", "1", "--lora-rank", "4",
                      "--sde-kind", "cps", "--eta", "0.8")
    assert flags.make_config(flags.parse_args(args)).sde_kind == "cps"
    history, _ = trainer.main(args)
    assert history[0]["ratio_dev_first"] < 1e-5 and math.isfinite(history[0]["loss"])
    assert checkpoint(tmp_path / "checkpoint")["fingerprint"]["sde_kind"] == "cps"
    # Resumed with the paper's step instead: refused before any model loads.
    resume = without(args, "--sde-kind") + ["--iterations", "2", "--resume",
                                            str(tmp_path / "checkpoint")]
    assert "differs in: sde_kind" in parse_error(resume, capsys)


def test_baseline_method_on_the_pipeline_schedule_with_one_step_per_iteration(tiny_flux,
                                                                              tiny_clip,
                                                                              tmp_path):
    history, _ = trainer.main(without(train_args(
        tiny_flux, tiny_clip, tmp_path, "--iterations", "1", "--lora-rank", "4", "--method",
        "full_sde", "--schedule", "pipeline", "--step-per-iteration"), "--granularities"))
    m = history[0]
    assert m["nfe"] == g2rpo.count_model_evals(5, (0, 1), (1, 2), 3, "full_sde")
    assert m["ratio_dev_first"] < 1e-5 and m["approx_kl"] < 1e-10  # one step: plain PG
    assert torch.isfinite(torch.tensor(m["loss"]))


def test_mixgrpo_trains_the_steps_of_its_sliding_window(tiny_flux, tiny_clip, tmp_path):
    argv = without(train_args(tiny_flux, tiny_clip, tmp_path, "--iterations", "3", "--lora-rank",
                              "4", "--method", "mixgrpo", "--window-size", "1", "--window-every",
                              "1", "--report-to", "tensorboard", "--steps", "4"),
                   "--branch-steps", "--granularities")
    history, _ = trainer.main(argv)
    # T = 4: a 1-step window lies within steps 0..1; it moves every iteration, then rolls back.
    assert [m["window"] for m in history] == [[0], [1], [0]]
    assert all(m["nfe"] == g2rpo.count_model_evals(4, (), (), 3, "mixgrpo") for m in history)
    assert all(m["train_rows"] == 3 and m["ratio_dev_first"] < 1e-5 for m in history)
    assert checkpoint(tmp_path / "checkpoint")["fingerprint"]["window_every"] == 1
    assert [r["window"] for r in metrics_rows(tmp_path)] == [[0], [1], [0]]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert {"train/adv_abs_k/0", "train/adv_abs_k/1"} <= set(events.Tags()["scalars"])


def assert_resume_is_bit_exact(flux, clip, tmp_path, *extra):
    """2 iterations straight == 1 + save + resume + 1: weights, AdamW state, RNG (any device)."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    trainer.main(train_args(flux, clip, straight, "--iterations", "2", *extra))
    trainer.main(train_args(flux, clip, split, "--iterations", "1", *extra))
    history, _ = trainer.main(train_args(flux, clip, split, "--iterations", "2", *extra,
                                         "--resume", str(split / "checkpoint")))
    assert [m["iteration"] for m in history] == [1]
    logged = [json.loads(line) for line in (split / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in logged] == [0, 1]  # the resumed run appends
    a, b = checkpoint(straight / "checkpoint"), checkpoint(split / "checkpoint")
    assert a["iteration"] == b["iteration"] == 1
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert set(sa) == set(sb) and len(sa) > 0
    for k in sa:
        for name in sa[k]:
            assert torch.equal(torch.as_tensor(sa[k][name]), torch.as_tensor(sb[k][name]))
    assert torch.equal(a["rng"]["rank0"]["generator"], b["rng"]["rank0"]["generator"])
    assert a.keys() == b.keys()
    for k in a.get("ema", {}):  # the EMA weights, when on
        assert torch.equal(a["ema"][k], b["ema"][k]), k
    return a


def test_resume_continues_bit_for_bit(tiny_flux, tiny_clip, tmp_path):
    assert_resume_is_bit_exact(tiny_flux, tiny_clip, tmp_path, "--lora-rank", "0")


def test_resume_with_kl_and_ema_continues_bit_for_bit(tiny_flux, tiny_clip, tmp_path):
    # Full fine-tune: the frozen reference copy is rebuilt from the pretrained weights on resume.
    saved = assert_resume_is_bit_exact(tiny_flux, tiny_clip, tmp_path, "--lora-rank", "0",
                                       "--kl-beta", "0.5", "--ema-decay", "0.9")
    assert saved["ema"].keys() == saved["model"].keys()
    assert any(not torch.equal(saved["ema"][k], v) for k, v in saved["model"].items())
    rows = metrics_rows(tmp_path / "split")  # kl_ref logged every iteration
    assert all(math.isfinite(r["kl_ref"]) for r in rows) and rows[1]["kl_ref"] > 0


def fake_args(**kw):
    import types

    return types.SimpleNamespace(**{"height": H, "width": W, "guidance": 3.5,
                                    "attention_backends": "math", **kw})


def test_lora_reference_is_the_transformer_with_its_adapter_off(tiny_flux):
    base = loading.load_pipeline(tiny_flux)
    pipe = loading.load_pipeline(tiny_flux)
    raw = pipe.transformer
    torch.manual_seed(0)
    trainer.setup_trainable(raw, 4, 4)
    with torch.no_grad():  # a trained adapter: B away from its zero initialisation
        for name, p in raw.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    trainable = {n for n, p in raw.named_parameters() if p.requires_grad}
    x, sigma, cond = tiny_inputs(pipe)
    reference = trainer.reference_velocity(raw, None, pipe, fake_args(), torch.float32)
    policy = Velocity.from_pipe(raw, pipe, H, W, attention="math")
    v_base = Velocity.from_pipe(base.transformer, base, H, W)(x, sigma, cond)
    torch.testing.assert_close(reference(x, sigma, cond), v_base, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(policy(x, sigma, cond), v_base, atol=1e-4)  # the adapter is on
    assert {n for n, p in raw.named_parameters() if p.requires_grad} == trainable  # as before
    assert sum(p.numel() for p in raw.parameters()) == sum(
        p.numel() for p in base.transformer.parameters()) + sum(
        p.numel() for n, p in raw.named_parameters() if n in trainable)  # no extra weights


def test_full_fine_tune_reference_is_a_frozen_copy_in_the_compute_dtype(tiny_flux):
    pipe = loading.load_pipeline(tiny_flux)
    original = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    reference = parallel.frozen_reference(pipe.transformer, torch.bfloat16)
    trainer.setup_trainable(pipe.transformer, 0, 1.0)
    with torch.no_grad():
        for p in pipe.transformer.parameters():
            p.add_(1.0)  # the policy moves; the reference must not
    assert reference is not pipe.transformer and not reference.training
    for k, v in reference.state_dict().items():
        assert v.dtype == torch.bfloat16 and torch.equal(v, original[k].bfloat16()), k
    assert not any(p.requires_grad for p in reference.parameters())


SHARDED_REFERENCE = """
import sys, torch, torch.distributed as dist
sys.path.insert(0, {root!r})
from image_flow import loading, parallel, trainer
from image_flow.velocity import Velocity
rank, world, device = parallel.init_distributed()
pipe = loading.load_pipeline({flux!r}, device, torch.bfloat16)
original = {{k: v.clone() for k, v in pipe.transformer.state_dict().items()}}
trainer.setup_trainable(pipe.transformer, 0, 1.0, upcast=False)
model = parallel.wrap_distributed(pipe.transformer, 0, device)
reference = parallel.frozen_reference(model, torch.bfloat16)
for name, p in reference.named_parameters():
    assert not p.requires_grad and p.dtype == torch.bfloat16, name
    assert p.to_local().numel() < p.numel(), name  # this rank holds a shard only
    assert torch.equal(p.full_tensor(), original[name]), name
print("reference ok on rank", rank, flush=True)
# A forward without gradient (an evaluation) leaves every module sharded, the root too: the
# parameters are the same sharded objects the optimizer and the EMA were built on.
params = list(model.parameters())
velocity = Velocity.from_pipe(model, pipe, 32, 32, dtype=torch.bfloat16)
with torch.no_grad():
    velocity(torch.randn(1, 4, 4, device=device), torch.ones(1, device=device),
             (torch.randn(1, 16, 32, device=device), torch.randn(1, 32, device=device)))
after = list(model.parameters())
assert len(after) == len(params) and all(a is b for a, b in zip(after, params))
assert all(type(p).__name__ == "DTensor" for p in after)
print("sharded after a forward on rank", rank, flush=True)
dist.destroy_process_group()
"""


def test_fsdp2_shards_the_blocks_the_model_declares_unsplittable(tiny_flux):
    t = loading.load_pipeline(tiny_flux).transformer
    blocks = parallel.blocks_to_shard(t)
    assert set(t._no_split_modules) == {"FluxTransformerBlock", "FluxSingleTransformerBlock"}
    assert [id(b) for b in blocks] == [id(b) for b in (*t.transformer_blocks,
                                                       *t.single_transformer_blocks)]

    class Inner(torch.nn.Linear):
        pass

    class Outer(torch.nn.Sequential):
        pass

    class Model(torch.nn.Sequential):
        _no_split_modules = ["Outer", "Inner"]

    model = Model(Outer(Inner(2, 2), Inner(2, 2)), Inner(2, 2))
    assert parallel.blocks_to_shard(model) == [model[0], model[1]]  # outermost only
    with pytest.raises(ValueError, match="Linear declares no _no_split_modules"):
        parallel.blocks_to_shard(torch.nn.Linear(2, 2))
    Model._no_split_modules = ["Missing"]
    with pytest.raises(ValueError, match=r"holds none of its _no_split_modules \['Missing'\]"):
        parallel.blocks_to_shard(model)


def test_fsdp2_reference_is_sharded_and_the_policy_stays_sharded_after_an_evaluation(
        tiny_flux, tmp_path):
    script = tmp_path / "sharded_reference.py"
    script.write_text(SHARDED_REFERENCE.format(root=str(ROOT), flux=tiny_flux))
    stdout = two_processes(str(script), tmp_path, timeout=300)
    assert stdout.count("reference ok on rank") == 2
    assert stdout.count("sharded after a forward on rank") == 2


def test_ema_run_evaluates_and_exports_the_averages(tiny_flux, tiny_clip, tmp_path, capsys):
    trainer.main(train_args(tiny_flux, tiny_clip, tmp_path, "--iterations", "2",
                            "--lora-rank", "4", "--ema-decay", "0.5", "--kl-beta", "0.1",
                            "--eval", "--eval-seeds", "0"))
    out = capsys.readouterr().out
    assert "KL penalty β = 0.1 to the reference: the transformer with its LoRA switched off" in out
    assert "eval after 0 iterations (EMA weights, decay 0.5)" in out
    assert "eval after 2 iterations (EMA weights, decay 0.5)" in out
    saved = checkpoint(tmp_path / "checkpoint")
    assert saved["fingerprint"]["ema_decay"] == 0.5 and saved["fingerprint"]["kl_beta"] == 0.1
    # The exported LoRA is the averages, not the last weights.
    fresh = loading.load_pipeline(tiny_flux)
    fresh.load_lora_weights(str(tmp_path / "lora"))
    averaged = loading.load_pipeline(tiny_flux)
    trainer.setup_trainable(averaged.transformer, 4, 4)
    assert not averaged.transformer.load_state_dict(saved["ema"], strict=False).unexpected_keys
    assert_same_model(fresh, averaged, loading.load_pipeline(tiny_flux))
    last = trained_pipeline(tiny_flux, tmp_path / "checkpoint", 4, 4)
    x, sigma, cond = tiny_inputs(fresh)
    v = [Velocity.from_pipe(p.transformer, p, H, W)(x, sigma, cond)
         for p in (fresh, last)]
    assert not torch.allclose(v[0], v[1])
    # ... and the evaluation after training scored the averages: the same grid again.
    scores = json.loads((tmp_path / "eval.json").read_text())["evaluations"][-1]["in_domain"]
    again, _ = trainer.evaluate(averaged, Velocity.from_pipe(
        averaged.transformer, averaged, H, W), PromptEncoder(averaged, 16),
        rewards.load_rewards("clip", "cpu", clip_model=tiny_clip),
        loading.BUILTIN_EVAL_PROMPTS, H, W, trainer.sigma_grid(averaged, 4, H, W, "pipeline"),
        [0])
    assert again == pytest.approx(scores, rel=1e-5)


def test_checkpoint_of_another_config_is_refused_before_any_model_loads(tiny_flux, tiny_clip,
                                                                        tmp_path, capsys):
    trainer.main(train_args(tiny_flux, tiny_clip, tmp_path, "--iterations", "1",
                            "--lora-rank", "4"))
    capsys.readouterr()
    ckpt = str(tmp_path / "checkpoint")

    def refused(*extra, drop=()):
        # Refused by parse_args, which loads no weights.
        return parse_error(without(train_args(tiny_flux, tiny_clip,
                                              tmp_path / "b", "--iterations", "2",
                                              "--lora-rank", "4", *extra, "--resume", ckpt),
                                   *drop), capsys)

    assert "differs in: lora_alpha, lora_rank" in refused("--lora-rank", "2")
    # Every algorithm setting is in the fingerprint: another eta is refused, naming both values.
    assert "--resume: checkpoint" in refused("--eta", "0.5")
    assert "differs in: eta (eta: checkpoint 0.7, now 0.5)" in refused("--eta", "0.5")
    for flag, value in (("--guidance", "2.0"), ("--clip-range", "0.01"), ("--shift", "2.0"),
                        ("--schedule", "pipeline")):
        assert f"differs in: {flag[2:].replace('-', '_')}" in refused(flag, value)
    assert "differs in: step_per_iteration" in refused("--step-per-iteration")
    # The guard rails too: turned on (or changed) on resume is another run.
    for flag, key in (("--kl-beta", "kl_beta"), ("--ema-decay", "ema_decay")):
        assert f"differs in: {key} ({key}: checkpoint None, now 0.5)" in refused(flag, "0.5")
    # Another method, with the window flags of its own.
    assert ("differs in: granularities, method, window_every, window_size, "
            "window_stride") in refused("--method", "mixgrpo", "--window-size", "2",
                                        drop=("--branch-steps", "--granularities"))


def test_a_changed_learning_rate_is_applied_on_resume_and_logged(tiny_flux, tiny_clip, tmp_path,
                                                                 capsys):
    trainer.main(train_args(tiny_flux, tiny_clip, tmp_path, "--iterations", "1",
                            "--lora-rank", "4", "--lr", "1e-3"))
    trainer.main(train_args(tiny_flux, tiny_clip, tmp_path, "--iterations", "2",
                            "--lora-rank", "4", "--lr", "5e-4", "--resume",
                            str(tmp_path / "checkpoint")))
    assert "learning rate: checkpoint 0.001, this run 0.0005: applying 0.0005" in capsys.readouterr().out
    groups = checkpoint(tmp_path / "checkpoint")["optimizer"]["param_groups"]
    assert {g["lr"] for g in groups} == {5e-4}


def tiny_lora_state(flux):
    """(model, optimizer, generator) of a tiny LoRA set-up with one optimizer step taken."""
    pipe = loading.load_pipeline(flux)
    model = pipe.transformer
    trainer.setup_trainable(model, 2, 2)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params)
    sum(p.sum() for p in params).backward()
    opt.step()
    return model, opt, torch.Generator().manual_seed(0)


def files(path):
    return {f.name: f.read_bytes() for f in sorted(Path(path).iterdir())}


def test_an_interrupted_save_leaves_the_previous_checkpoint_intact(tiny_flux, tmp_path,
                                                                   monkeypatch):
    model, opt, g = tiny_lora_state(tiny_flux)
    path = tmp_path / "checkpoint"
    checkpoints.Checkpointer(path).save(model, opt, g, 0, {"x": 1})
    before = files(path)
    real_save = checkpoints.dcp.save

    def broken_save(state, checkpoint_id, **kw):
        real_save(state, checkpoint_id=checkpoint_id, **kw)
        (Path(checkpoint_id) / "__0_0.distcp").write_bytes(b"partial")
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(checkpoints.dcp, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.Checkpointer(path).save(model, opt, g, 1, {"x": 1})
    assert files(path) == before and checkpoint(path)["iteration"] == 0


KILLED_SAVE = """
import os, signal, sys
from pathlib import Path
import torch
from torch.distributed.checkpoint.filesystem import FileSystemWriter
sys.path[:0] = [{root!r}, {tests!r}]
import test_image_flow
from image_flow import checkpoints

model, opt, g = test_image_flow.tiny_lora_state({flux!r})
path = Path({path!r})
checkpoints.Checkpointer(path).save(model, opt, g, 0, {{"x": 1}})
real_write = FileSystemWriter.write_data

def write_half_then_die(self, plan, planner):
    real_write(self, plan, planner).wait()
    shard = next(Path(self.path).glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    os.kill(os.getpid(), signal.SIGKILL)

FileSystemWriter.write_data = write_half_then_die
checkpoints.Checkpointer(path).save(model, opt, g, 1, {{"x": 1}})
"""


def test_kill_9_during_a_save_leaves_the_previous_checkpoint_resumable(tiny_flux, tmp_path):
    path = tmp_path / "checkpoint"
    script = KILLED_SAVE.format(root=str(ROOT), tests=str(ROOT / "tests"), flux=tiny_flux,
                                path=str(path))
    env = {**os.environ, **SUBPROCESS_ENV}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       timeout=300, env=env)
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    half = tmp_path / "checkpoint.tmp"
    assert half.is_dir() and not (half / ".metadata").exists()  # died half-way through
    model, opt, g = tiny_lora_state(tiny_flux)
    assert checkpoints.load_checkpoint(path, model, opt, g, {"x": 1}, seed=0) == 1  # iteration 0
    checkpoints.Checkpointer(path).save(model, opt, g, 1, {"x": 1})  # the next save starts afresh
    assert checkpoint(path)["iteration"] == 1 and not half.exists()


@pytest.mark.parametrize("lora_rank,dtype", [("4", "fp32"), ("0", "bf16")])
def test_torchrun_two_processes_keep_ranks_identical(tiny_flux, tiny_clip, tmp_path, lora_rank,
                                                     dtype):
    # LoRA: DDP. Full fine-tune: FSDP2 with fp32 shards and bf16 autocast compute (CPU here).
    # With the guard rails on: LoRA's reference is the adapter switched off (outside DDP), full
    # fine-tune's a bf16 copy sharded like the policy; the EMA is sharded like the weights.
    # The LoRA case runs the real command line (torchrun's own process); the other, as every
    # other two-process test, through its launcher forked from here (two_processes).
    out = tmp_path / "ddp"
    args = train_args(tiny_flux, tiny_clip, out, "--iterations", "2", "--lora-rank", lora_rank,
                      "--dtype", dtype, "--kl-beta", "0.1", "--ema-decay", "0.9")
    if lora_rank == "4":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", str(29500 + os.getpid() % 1000), "-m", "image_flow", *args]
        env = {**os.environ, **SUBPROCESS_ENV}
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        stdout = r.stdout
    else:
        stdout = two_processes(args, tmp_path)
    sums = json.loads((out / "rank_checksums.json").read_text())
    assert len(sums) == 2 and sums[0] == sums[1]
    assert "2 process(es)" in stdout
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in metrics] == [0, 1]
    assert all(type(m["iteration"]) is int for m in metrics)  # not averaged into a float
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics)
    assert all(math.isfinite(m["kl_ref"]) for m in metrics) and metrics[1]["kl_ref"] > 0
    if lora_rank == "0":
        assert "a frozen copy of the pretrained transformer (torch.bfloat16, sharded)" in stdout
    whole = checkpoint(out / "checkpoint")
    saved, ema = whole["model"], whole["ema"]
    assert ema.keys() == saved.keys() and all(v.dtype == torch.float32 for v in ema.values())
    assert saved and all(v.dtype == torch.float32 for v in saved.values())  # fp32 master weights
    assert sorted((out / "checkpoint").glob("*.distcp")) == [out / "checkpoint" / "__0_0.distcp",
                                                             out / "checkpoint" / "__1_0.distcp"]
    if lora_rank == "0":  # exported in the compute dtype, gathered from both ranks' shards
        from safetensors.torch import load_file

        exported = load_file(out / "transformer" / "diffusion_pytorch_model.safetensors")
        assert exported.keys() == saved.keys()
        for k, v in exported.items():  # the EMA weights are what is exported
            assert v.dtype == torch.bfloat16 and torch.equal(v, ema[k].bfloat16()), k


def training_record(out):
    """What training produced: the checkpoint's weights and the per-iteration metrics (all but
    the wall time)."""
    rows = [{k: v for k, v in r.items() if k != "seconds"} for r in metrics_rows(out)]
    return checkpoint(out / "checkpoint")["model"], rows


@pytest.mark.parametrize("lora_rank", ["0", "4"])  # FSDP2 full fine-tune; DDP + LoRA
def test_evaluation_export_and_checkpoints_never_change_training(tiny_flux, tiny_clip, tmp_path,
                                                                 lora_rank):
    # Evaluation before training and after every iteration (with the EMA: inside its swap),
    # an export and an asynchronous checkpoint after every iteration, two processes: the
    # trained weights and every logged metric equal those of a run that does none of it.
    def run(name, *extra):
        out = tmp_path / name
        # Batches of 3 (training and evaluation) and decodes of 3: evaluation's 4 prompts take
        # two transformer calls and two decodes.
        two_processes(train_args(tiny_flux, tiny_clip, out, "--iterations", "2", "--lora-rank",
                                 lora_rank, "--batch-size", "3", "--decode-batch", "3", *extra),
                      tmp_path)
        return training_record(out)

    weights, rows = run("plain")
    assert [r["iteration"] for r in rows] == [0, 1]
    observe = ["--eval-every", "1", "--eval-seeds", "0", "--export-every", "1", "--save-every",
               "1", "--async-save"]
    for ema in ([], ["--ema-decay", "0.9"]):  # the EMA itself does not change training either
        observed_weights, observed_rows = run("observed" + "_ema" * bool(ema), *observe, *ema)
        assert observed_rows == rows
        assert observed_weights.keys() == weights.keys()
        for k, v in weights.items():
            assert torch.equal(observed_weights[k], v), k
        evals = json.loads((tmp_path / ("observed" + "_ema" * bool(ema)) / "eval.json")
                           .read_text())["evaluations"]
        assert [e["iteration"] for e in evals] == [0, 1, 2]


# What the processes of two_processes start with imported: the trainer, the models of every
# family, the rewards' and LoRA's libraries.
PRELOADED = ["test_image_flow", "image_flow.trainer", "image_flow.plan", "diffusers.models",
             "diffusers.pipelines.flux.pipeline_flux", "peft", "transformers.models.clip",
             "torch.distributed.fsdp"]


def two_processes(target, cwd, timeout=600):
    """Both ranks' stdout of `torchrun --nproc_per_node 2 -m image_flow TARGET` (TARGET: the
    arguments), or of a script (TARGET: its path): torch's elastic launcher, which torchrun runs,
    gives each rank its torchrun environment, but the two processes are forked from this one and
    start with the imports done (about 9 s less per process on 2 cores). A failed rank raises
    with both ranks' output; test_torchrun_two_processes_keep_ranks_identical runs the real
    command line."""
    import uuid

    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    logs = Path(cwd) / f"ranks-{uuid.uuid4().hex[:8]}"
    logs.mkdir()
    # Forked by a server process that imported the trainer and ran nothing: a fork of this
    # process, which has run torch's thread pools, would inherit them broken.
    multiprocessing.forkserver.set_forkserver_preload(PRELOADED)
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=2, run_id=logs.name,
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0,
                          monitor_interval=0.05, start_method="forkserver")
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP,
                                                   signal.SIGQUIT)}
    try:  # the launcher installs its own signal handlers in the calling process
        elastic_launch(config, _rank_main)(target, str(cwd), str(logs), timeout)
    except Exception as e:
        raise AssertionError(f"{e}\n" + "\n".join(
            f"--- {f.name}\n{f.read_text()[-3000:]}" for f in sorted(logs.iterdir()))) from None
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    return "".join((logs / f"stdout.{rank}").read_text() for rank in (0, 1))


def _rank_main(target, cwd, logs, timeout):
    """One rank of two_processes: its output to logs/{stdout,stderr}.RANK, then `python -m
    image_flow TARGET` or the script TARGET; killed by SIGALRM after `timeout` seconds."""
    signal.alarm(timeout)
    os.chdir(cwd)
    os.environ.update(SUBPROCESS_ENV)
    for fd, name in ((1, "stdout"), (2, "stderr")):
        f = os.open(os.path.join(logs, f"{name}.{os.environ['RANK']}"),
                    os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(f, fd)
        os.close(f)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    try:
        if isinstance(target, (list, tuple)):
            sys.argv = ["image_flow", *target]
            runpy.run_module("image_flow", run_name="__main__", alter_sys=True)
        else:
            sys.argv = [target]
            runpy.run_path(target, run_name="__main__")
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def assert_loaded_exactly(flux, path, lora_rank):
    """A fresh one-process model, AdamW and EMA hold exactly the checkpoint's weights, state and
    averages."""
    pipe = loading.load_pipeline(flux)
    model = pipe.transformer
    trainer.setup_trainable(model, int(lora_rank), max(int(lora_rank), 1))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    ema = g2rpo.EMA(model, 0.9)
    fp = checkpoint(path)["fingerprint"]
    said = []
    checkpoints.load_checkpoint(path, model, opt, torch.Generator(), fp, seed=0, log=said.append,
                                ema=ema)
    assert any(s.startswith("elastic resume: checkpoint written by 2 process(es), this run has 1")
               for s in said), said
    saved, names = checkpoint(path), dict(model.named_parameters())
    assert set(saved["model"]) == {n for n, p in names.items() if p.requires_grad}
    for k, v in saved["model"].items():
        assert torch.equal(names[k].detach(), v), k
    for k, v in saved["ema"].items():
        assert torch.equal(ema.state_dict()[k], v), k
    by_param = {id(p): s for p, s in opt.state.items()}
    for k, state in saved["optimizer"]["state"].items():
        for name, v in state.items():
            assert torch.equal(torch.as_tensor(by_param[id(names[k])][name]), v), (k, name)


@pytest.mark.parametrize("lora_rank", ["4", "0"])  # DDP + LoRA; FSDP2 full fine-tune
def test_elastic_resume_one_to_two_and_two_to_one_processes(tiny_flux, tiny_clip, tmp_path,
                                                            lora_rank):
    out = tmp_path / "run"
    args = train_args(tiny_flux, tiny_clip, out, "--lora-rank", lora_rank, "--ema-decay", "0.9")
    trainer.main(args + ["--iterations", "1"])  # 1 process
    ckpt = out / "checkpoint"
    # 1 → 2: the weights arrive whole on both ranks (their checksums equal the checkpoint's).
    stdout = two_processes(args + ["--iterations", "1", "--resume", str(ckpt)], tmp_path)
    assert "checkpoint is at iteration 1 of 1: nothing to train" in stdout
    params = checkpoint(ckpt)["model"].values()
    expected = torch.stack([p.double().sum() for p in params]).sum().item()
    sums = json.loads((out / "rank_checksums.json").read_text())
    assert sums == pytest.approx([expected] * 2, rel=1e-12, abs=1e-12)
    # ... and training goes on under 2 processes, saying the sampling noise is new.
    stdout = two_processes(args + ["--iterations", "2", "--resume", str(ckpt)], tmp_path)
    assert stdout.count("elastic resume: checkpoint written by 1 process(es), this run has 2; "
                        "weights and optimizer state continue exactly, sampling noise does "
                        "not") == 1
    assert checkpoint(ckpt)["world_size"] == 2
    # 2 → 1: DCP reshards every weight and every AdamW moment exactly, then training goes on.
    assert_loaded_exactly(tiny_flux, ckpt, lora_rank)
    trainer.main(args + ["--iterations", "3", "--resume", str(ckpt)])
    assert [m["iteration"] for m in metrics_rows(out)] == [0, 1, 2]  # no gap, no duplicate
    assert checkpoint(ckpt)["iteration"] == 2 and checkpoint(ckpt)["world_size"] == 1


def test_async_save_writes_what_a_synchronous_save_writes(tiny_flux, tiny_clip, tmp_path):
    for name, extra in (("sync", []), ("async", ["--async-save"])):
        trainer.main(train_args(tiny_flux, tiny_clip, tmp_path / name, "--iterations", "3",
                                "--save-every", "1", "--lora-rank", "0", *extra))
    a, b = (checkpoint(tmp_path / name / "checkpoint") for name in ("sync", "async"))
    assert a["iteration"] == b["iteration"] == 2
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k in a["optimizer"]["state"]:
        for name, v in a["optimizer"]["state"][k].items():
            assert torch.equal(v, b["optimizer"]["state"][k][name]), (k, name)
    assert not (tmp_path / "async" / "checkpoint.tmp").exists()


def held_write(monkeypatch, fail_first=False):
    """Hold DCP's shard writes until the returned event is set (the save stays in flight while
    the test trains); with fail_first, the first write then fails as a full disk would."""
    import threading

    from torch.distributed.checkpoint.filesystem import FileSystemWriter

    release, real_write, calls = threading.Event(), FileSystemWriter.write_data, []

    def write(self, plan, planner):
        calls.append(self.path)
        if len(calls) == 1:
            assert release.wait(60), "the test never released the write"
            if fail_first:
                raise OSError(28, "No space left on device")
        return real_write(self, plan, planner)

    monkeypatch.setattr(FileSystemWriter, "write_data", write)
    return release


def train_one_step(model, opt):
    params = [p for p in model.parameters() if p.requires_grad]
    sum((p**2).sum() for p in params).backward()
    opt.step()
    opt.zero_grad()


def assert_holds(path, iteration, weights, moments):
    saved = checkpoint(path)
    assert saved["iteration"] == iteration
    assert saved["model"].keys() == weights.keys()
    for k, v in weights.items():
        assert torch.equal(saved["model"][k], v), k
    for k, state in moments.items():
        for name, v in state.items():
            assert torch.equal(torch.as_tensor(saved["optimizer"]["state"][k][name]), v), (k, name)


def snapshot(model, opt):
    """(trainable weights, AdamW state) by parameter name, copied."""
    names = {id(p): n for n, p in model.named_parameters()}
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    moments = {names[id(p)]: {k: torch.as_tensor(v).clone() for k, v in s.items()}
               for p, s in opt.state.items()}
    return weights, moments


def test_an_async_save_holds_its_own_iteration_while_training_goes_on(tiny_flux, tmp_path,
                                                                      monkeypatch):
    model, opt, g = tiny_lora_state(tiny_flux)
    path = tmp_path / "checkpoint"
    release = held_write(monkeypatch)
    checkpointer = checkpoints.Checkpointer(path, async_save=True)
    checkpointer.save(model, opt, g, 3, {"x": 1})
    weights, moments = snapshot(model, opt)
    train_one_step(model, opt)  # the weights and AdamW's moments change while the save waits
    assert checkpointer.pending is not None and not path.exists()
    assert any(not torch.equal(p, weights[n]) for n, p in snapshot(model, opt)[0].items())
    release.set()
    checkpointer.close()
    assert_holds(path, 3, weights, moments)


def test_a_failed_async_save_is_rescued_with_the_state_of_its_own_iteration(
        tiny_flux, tmp_path, monkeypatch):
    model, opt, g = tiny_lora_state(tiny_flux)
    path = tmp_path / "checkpoint"
    release = held_write(monkeypatch, fail_first=True)
    checkpointer = checkpoints.Checkpointer(path, async_save=True)
    checkpointer.save(model, opt, g, 3, {"x": 1})
    weights, moments = snapshot(model, opt)
    train_one_step(model, opt)
    release.set()
    with pytest.raises(OSError, match=f"could not write checkpoint '{path}': No space left on "
                                      f"device; this iteration's state was saved to") as e:
        checkpointer.close()
    rescue = Path(str(e.value).split("saved to ")[1].split(" instead")[0])
    try:
        assert rescue.name.endswith("-000003")
        assert_holds(rescue, 3, weights, moments)  # not the weights training has moved on to
    finally:
        import shutil
        shutil.rmtree(rescue, ignore_errors=True)
    assert not path.exists() and not path.with_name("checkpoint.tmp").exists()


def test_a_finished_run_says_there_is_nothing_to_train_and_a_refused_resume_is_one_line(
        tiny_flux, tiny_clip, tmp_path, capsys):
    args = train_args(tiny_flux, tiny_clip, tmp_path, "--iterations", "2", "--lora-rank", "4")
    trainer.main(args)
    before = files(tmp_path / "checkpoint")
    capsys.readouterr()
    history, _ = trainer.main(args + ["--resume", str(tmp_path / "checkpoint")])
    assert history == []
    assert "checkpoint is at iteration 2 of 2: nothing to train" in capsys.readouterr().out
    assert files(tmp_path / "checkpoint") == before  # nothing rewritten
    # `python -m image_flow ...`, run in this process: the exit status and all it prints.
    argv = sys.argv
    sys.argv = ["image_flow", *args, "--eta", "0.5", "--resume", str(tmp_path / "checkpoint")]
    try:
        with pytest.raises(SystemExit) as exit:
            runpy.run_module("image_flow", run_name="__main__", alter_sys=True)
    finally:
        sys.argv = argv
    err = capsys.readouterr().err
    assert exit.value.code == 2 and "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1].startswith(
        f"python -m image_flow: error: --resume: checkpoint '{tmp_path / 'checkpoint'}' was made for "
        f"another model or config; it differs in: eta")


# ----------------------------------------------------------------------------------------------
# Bad input.


def parse_error(argv, capsys):
    """trainer.main(argv) must stop at argument checking (exit 2); return what it printed."""
    with pytest.raises(SystemExit) as e:
        trainer.main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("extra,message", [
    (["--max-grad-norm", "-1"], "--max-grad-norm: max_grad_norm must be > 0, got -1"),
    (["--max-grad-norm", "nan"], "--max-grad-norm: max_grad_norm must be finite, got nan"),
    (["--save-every", "0"], "--save-every must be >= 1, got 0"),
    (["--decode-batch", "0"], "--decode-batch must be >= 1, got 0"),
    (["--eval-seeds", ","], "--eval-seeds: expected at least one integer, got ','"),
    (["--branch-steps", "0,x"], "--branch-steps: expected comma-separated integers"),
    (["--steps", "1"], "--steps: num_steps must be an integer >= 2, got 1"),
    (["--prompts-per-gpu", "0"], "--prompts-per-gpu: prompts_per_iteration must be an integer >= 1"),
    (["--group-size", "1"], "--group-size: group_size must be an integer >= 2"),
    (["--iterations", "-1"], "--iterations: num_iterations must be an integer >= 0, got -1"),
    (["--height", "33"], "--height must be a positive multiple of 16"),
    (["--width", "0"], "--width must be a positive multiple of 16"),
    (["--lr", "0"], "--lr: lr must be > 0, got 0"),
    (["--lora-alpha", "0"], "--lora-alpha must be > 0 and finite, got 0"),
    (["--lora-rank", "-1"], "--lora-rank must be >= 0, got -1"),
    (["--guidance", "nan"], "--guidance must be finite, got nan"),
    (["--eta", "inf"], "--eta: eta must be finite, got inf"),
    (["--shift", "-3"], "--shift: shift must be > 0, got -3"),
    (["--branch-steps", "0,15"], "--branch-steps: branch step 15 is outside 0..3"),
    (["--rewards", "clip,aesthetic"], "unknown reward 'aesthetic'"),
    (["--attention-backends", "flash,cudnn2"], "unknown attention backend 'cudnn2'"),
    (["--resume", "nope"], "--resume: checkpoint 'nope' does not exist"),
    (["--export-every", "-1"], "--export-every must be >= 0 (0: at the end only), got -1"),
    (["--max-shard-size", "10XB"], "--max-shard-size: expected a size such as 10GB"),
    (["--max-shard-size", "0"], "--max-shard-size: a size must be at least 1 byte, got '0'"),
    (["--method", "mixgrpo"], "--branch-steps is not used by --method mixgrpo"),
    (["--method", "full_sde"], "--granularities is not used by --method full_sde"),
    (["--window-every", "5"], "--window-every is not used by --method g2rpo"),
])
def test_every_flag_is_checked_before_any_model_loads(tiny_flux, tmp_path, capsys, monkeypatch,
                                                     extra, message):
    # The checkpoint's configs are read; a reward or the pipeline loading is a failure.
    monkeypatch.setattr(trainer, "load_pipeline", None)
    argv = train_args(tiny_flux, str(tmp_path / "no_clip_here"),
                      tmp_path / "out", "--iterations", "1", *extra)
    assert message in parse_error(argv, capsys)
    assert not (tmp_path / "out").exists()


def test_paths_are_checked_before_any_model_loads(tiny_flux, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(trainer, "load_pipeline", None)
    base = train_args(tiny_flux, str(tmp_path / "no_clip_here"),
                      tmp_path / "out", "--iterations", "1")
    (tmp_path / "a_file").write_text("x")
    assert f"'{tmp_path / 'a_file'}' is a file, not a directory" in parse_error(
        base + ["--output-dir", str(tmp_path / "a_file" / "sub")], capsys)
    assert "'" + str(tmp_path / "a_file") + "' is a file, not a directory" in parse_error(
        base + ["--output-dir", str(tmp_path / "a_file")], capsys)
    assert "missing.txt' does not exist" in parse_error(
        base + ["--prompts", str(tmp_path / "missing.txt")], capsys)
    assert "is a directory, not a text file" in parse_error(base + ["--prompts", str(tmp_path)],
                                                            capsys)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café au lait\n".encode("latin-1"))
    assert f"prompt file '{latin1}' is not UTF-8 text" in parse_error(
        base + ["--prompts", str(latin1)], capsys)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    assert "holds no prompts" in parse_error(base + ["--eval-prompts", str(empty)], capsys)
    assert (f"--resume: checkpoint '{latin1}' is a single file, as versions of this trainer "
            "wrote") in parse_error(base + ["--resume", str(latin1)], capsys)
    assert "exclude each other" in parse_error(
        base + ["--resume", str(tmp_path), "--overwrite"], capsys)


def test_prompt_files_drop_a_utf8_bom(tmp_path):
    f = tmp_path / "bom.txt"
    f.write_bytes("\ufeffa red fox\n\nun café\n".encode("utf-8"))
    assert loading.read_prompts(f) == ["a red fox", "un café"]


def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        flags.parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "(default: 0.7)" in out and "(default: runs/<family>: runs/flux," in out and "(default: 50)" in out
    # Each default once, in the form the flag takes.
    assert "0,1,2,3,4,5,6,7 for T = 16, 0,1 for T = 4)" in out
    assert "(default: 1,2,3, less those whose completion repeats another's at some branch step: " \
        "1 at T = 4)" in out
    assert "(default: None)" not in out and "(default: False)" not in out
    options = out.split(" options: ")[1]
    for flag in ("--prompts", "--lora-alpha", "--lr", "--dtype", "--step-per-iteration"):
        text = options.split(f" {flag} ")[1].split(" --")[0]
        assert text.count("(default") == 1, (flag, text)


def test_lora_targets_are_checked_before_any_weights_load_and_only_they_train(
        tiny_flux, tiny_clip, tmp_path, capsys):
    args = train_args(tiny_flux, tiny_clip, tmp_path, "--iterations", "1", "--lora-rank", "4")
    err = parse_error(args + ["--lora-targets", "to_q,to_qq"], capsys)
    assert "--lora-targets: 'to_qq' names no linear layer of the FluxTransformer2DModel" in err
    assert "its linear layers end in" in err and "to_out.0" in err and "proj_mlp" in err
    assert "--lora-targets needs --lora-rank > 0" in parse_error(
        train_args(tiny_flux, tiny_clip, tmp_path, "--lora-rank", "0", "--lora-targets", "to_q"),
        capsys)
    assert "listed twice" in parse_error(args + ["--lora-targets", "to_q,to_q"], capsys)
    trainer.main(args + ["--lora-targets", "to_q,ff.net.2"])
    saved = checkpoint(tmp_path / "checkpoint")
    assert saved["fingerprint"]["lora_targets"] == ["to_q", "ff.net.2"]
    trained = {k.split(".lora_")[0].split(".")[-1] for k in saved["model"]}
    assert trained == {"to_q", "2"}, trained  # to_q and ff.net.2 adapters only
    # The export carries them: diffusers loads it and gives the trained velocity.
    fresh = loading.load_pipeline(tiny_flux)
    fresh.load_lora_weights(str(tmp_path / "lora"))
    pipe = loading.load_pipeline(tiny_flux)
    trainer.setup_trainable(pipe.transformer, 4, 4, lora_targets=("to_q", "ff.net.2"))
    assert not pipe.transformer.load_state_dict(saved["model"], strict=False).unexpected_keys
    x, sigma, cond = tiny_inputs(fresh)
    v = [Velocity.from_pipe(p.transformer, p, H, W)(x, sigma, cond)
         for p in (fresh, pipe)]
    torch.testing.assert_close(v[0], v[1])
    # Resuming with other targets is refused (the default ones, here).
    assert "lora_targets" in parse_error(
        without(args, "--output-dir") + ["--output-dir", str(tmp_path / "b"), "--resume",
                                         str(tmp_path / "checkpoint"), "--iterations", "2"],
        capsys)


def test_a_checkpoint_of_an_unsupported_pipeline_class_is_refused_before_any_weights_load(
        tiny_flux, tiny_clip, tmp_path, capsys):
    other = tmp_path / "sd3"
    other.mkdir()
    index = json.loads((Path(tiny_flux) / "model_index.json").read_text())
    (other / "model_index.json").write_text(json.dumps({**index, "_class_name":
                                                        "StableDiffusionXLPipeline"}))
    err = parse_error(train_args(str(other), tiny_clip, tmp_path / "out"), capsys)
    assert ("--model " + str(other) + ": a StableDiffusionXLPipeline checkpoint; the image trainer "
            "trains FluxPipeline (FLUX.1), StableDiffusion3Pipeline (SD3)") in err
    loading.check_pipeline_class(tiny_flux)  # FLUX.1 passes


def test_model_loading_errors_name_what_is_missing_and_rewards_load_first(
        tiny_flux, tiny_clip, tiny_hps, tmp_path, capsys, monkeypatch):
    base = train_args(tiny_flux, tiny_clip, tmp_path, "--iterations", "1")
    torch.save({"state_dict": {"visual.proj": torch.zeros(3)}}, tmp_path / "not_hps.pt")
    loads = []
    monkeypatch.setattr(trainer, "load_pipeline", lambda *a: loads.append(a))
    with pytest.raises(OSError, match="could not load reward model 'no-such/reward-model'"):
        trainer.main(base + ["--clip-model", "no-such/reward-model"])
    assert loads == []  # the reward is found missing before the image model loads
    # A checkpoint that is not there is a bad flag (exit 2), named before anything loads.
    (tmp_path / "empty").mkdir()
    assert f"the folder {str(tmp_path / 'empty')!r} has no model_index.json" in parse_error(
        base + ["--model", str(tmp_path / "empty")], capsys)
    assert "is neither a folder nor a Hub id (org/name)" in parse_error(
        base + ["--model", str(tmp_path / "no_flux_here")], capsys)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert ("model_index.json of 'no-such/checkpoint' is not in the Hugging Face cache and "
            "HF_HUB_OFFLINE is set; fetch it first with `hf download no-such/checkpoint`") in \
        parse_error(base + ["--model", "no-such/checkpoint"], capsys)
    # Online, the Hub's own answers: a gated repository, one that does not exist (or is private).
    import httpx2
    from huggingface_hub import errors

    response = httpx2.Response(401, request=httpx2.Request("GET", "https://huggingface.co"))

    def refusing(error):
        def hf_hub_download(*a, **k):
            raise error("refused", response=response)
        return hf_hub_download

    for error, said in ((errors.GatedRepoError, "'org/gated' is gated on the Hub: accept its "
                         "conditions at https://huggingface.co/org/gated, then log in"),
                        (errors.RepositoryNotFoundError, "the Hub has no repository 'org/gated' "
                         "that this account can see"),
                        (errors.RemoteEntryNotFoundError, "model_index.json of 'org/gated' is "
                         "neither in the Hugging Face cache nor in the Hub repository")):
        with monkeypatch.context() as online:
            online.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
            online.setattr("huggingface_hub.hf_hub_download", refusing(error))
            assert said in parse_error(base + ["--model", "org/gated"], capsys)
    # A missing HPS checkpoint is a bad flag (exit 2), for an evaluation-only reward too; the
    # default HPS-v2.1 file is not in this machine's cache.
    assert "--hps-checkpoint: no file " + str(tmp_path / "missing.pt") in parse_error(
        base + ["--rewards", "hps", "--hps-checkpoint", str(tmp_path / "missing.pt")], capsys)
    assert "hf download xswu/HPSv2 HPS_v2.1_compressed.pt" in parse_error(
        base + ["--eval-rewards", "clip,hps", "--eval"], capsys)
    with pytest.raises(OSError, match="is not an HPS checkpoint for OpenCLIP"):
        trainer.main(base + ["--rewards", "hps", "--hps-checkpoint", str(
            tmp_path / "not_hps.pt"), "--hps-model", tiny_hps[1]])
    assert not (tmp_path / "checkpoint").exists() and not (tmp_path / ".lock").exists()


# ----------------------------------------------------------------------------------------------
# The diffusers ecosystem: exported weights, tracking, evaluation during training.


def trained_pipeline(flux, ckpt, lora_rank, lora_alpha):
    """The trained model, rebuilt from a checkpoint: base pipeline + trainable setup + weights."""
    pipe = loading.load_pipeline(flux)
    trainer.setup_trainable(pipe.transformer, lora_rank, lora_alpha)
    result = pipe.transformer.load_state_dict(checkpoint(ckpt)["model"], strict=False)
    assert not result.unexpected_keys
    return pipe


def assert_same_model(pipe_a, pipe_b, base):
    """Same velocity on random inputs (and not the base model's), same η = 0 samples: pipe_a
    through FluxPipeline itself, pipe_b through trainer.sample."""
    x, sigma, cond = tiny_inputs(pipe_a)
    v = [Velocity.from_pipe(p.transformer, p, H, W)(x, sigma, cond)
         for p in (pipe_a, pipe_b, base)]
    torch.testing.assert_close(v[0], v[1])
    assert not torch.equal(v[1], v[2])  # training changed the model
    prompts = ["a red fox", "a lighthouse"]
    ref = pipe_a(prompts, generator=torch.Generator().manual_seed(0), output_type="latent",
                 height=H, width=W, num_inference_steps=5, guidance_scale=3.5,
                 max_sequence_length=16).images
    velocity = Velocity.from_pipe(pipe_b.transformer, pipe_b, H, W)
    ours, _ = trainer.sample(pipe_b, velocity, PromptEncoder(pipe_b, 16), prompts, H,
                             W, trainer.sigma_grid(pipe_b, 5, H, W, "pipeline"),
                             torch.Generator().manual_seed(0))
    torch.testing.assert_close(ref, ours)


def test_exported_lora_loads_with_load_lora_weights_and_reproduces_the_trained_model(
        tiny_flux, tiny_clip, tmp_path):
    trainer.main(train_args(tiny_flux, tiny_clip, tmp_path, "--iterations", "1",
                            "--lora-rank", "4", "--lora-alpha", "8"))  # alpha ≠ rank on purpose
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()
    fresh = loading.load_pipeline(tiny_flux)
    fresh.load_lora_weights(str(tmp_path / "lora"))
    trained = trained_pipeline(tiny_flux, tmp_path / "checkpoint", 4, 8)
    assert_same_model(fresh, trained, loading.load_pipeline(tiny_flux))


def test_exported_full_transformer_loads_with_from_pretrained(tiny_flux, tiny_clip, tmp_path,
                                                              capsys):
    from diffusers import FluxPipeline, FluxTransformer2DModel

    trainer.main(train_args(tiny_flux, tiny_clip, tmp_path, "--iterations", "3",
                            "--save-every", "1", "--lora-rank", "0", "--max-shard-size", "50KB"))
    out = capsys.readouterr().out  # exported once, at the end: not with every checkpoint
    assert out.count("exported the transformer") == 1 and "after 3 iterations" in out
    index = json.loads((tmp_path / "transformer" /
                        "diffusion_pytorch_model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    assert shards[0] == f"diffusion_pytorch_model-00001-of-{len(shards):05d}.safetensors"
    sizes = [(tmp_path / "transformer" / s).stat().st_size for s in shards]
    assert max(sizes) < 50_000 + 20_000  # one shard's tensors + the safetensors header
    transformer = FluxTransformer2DModel.from_pretrained(str(tmp_path / "transformer"))
    fresh = FluxPipeline.from_pretrained(tiny_flux, transformer=transformer)
    fresh.set_progress_bar_config(disable=True)
    trained = trained_pipeline(tiny_flux, tmp_path / "checkpoint", 0, 1)
    assert_same_model(fresh, trained, loading.load_pipeline(tiny_flux))


def test_tensorboard_gets_every_scalar_and_the_eval_grids(tiny_flux, tiny_clip, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer.main(train_args(tiny_flux, tiny_clip, tmp_path, "--iterations", "2", "--lora-rank",
                            "4", "--report-to", "tensorboard", "--eval-every", "1",
                            "--kl-beta", "0.05", "--eval-rewards", "clip,pickscore",
                            "--pickscore-model", tiny_clip, "--pickscore-processor", tiny_clip))
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    expected = {f"train/{k}" for k in ("reward", "reward_anchor", "loss", "clip_frac",
                                       "approx_kl", "kl_ref", "grad_norm", "nfe", "seconds")}
    expected |= {"train/adv_abs_k/0", "train/adv_abs_k/1", "train/adv_abs_lambda/1",
                 "train/adv_abs_lambda/2", "eval/in_domain/clip", "eval/out_of_domain/pickscore"}
    assert expected <= tags, expected - tags
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2]
    assert [e.step for e in events.Scalars("eval/in_domain/clip")] == [0, 1, 2]
    assert "eval/grid" in events.Tags()["images"]
    out = capsys.readouterr().out  # the console line carries loss, grad norm and s/it
    assert "| loss " in out and "| grad " in out and " s/it" in out and "| kl_ref " in out


def test_evaluation_schedule_and_captioned_grids(tiny_flux, tiny_clip, tmp_path):
    from PIL import Image

    _, evals = trainer.main(train_args(tiny_flux, tiny_clip, tmp_path, "--iterations", "3",
                                       "--lora-rank", "4", "--eval-every", "2"))
    assert [e["iteration"] for e in evals] == [0, 2, 3]  # before, every 2, after
    saved = json.loads((tmp_path / "eval.json").read_text())["evaluations"]
    assert [e["iteration"] for e in saved] == [0, 2, 3] and "clip" in saved[0]["in_domain"]
    grid = Image.open(tmp_path / "eval_000002.png")
    assert grid.width > 4 * W and grid.height > 2 * H  # captions around 2 seeds × 4 prompts
    _, evals = trainer.main(train_args(tiny_flux, tiny_clip, tmp_path / "only", "--iterations",
                                       "0", "--eval"))
    assert [e["iteration"] for e in evals] == [0]  # an eval-only run evaluates once
    assert not (tmp_path / "only" / "checkpoint").exists()


def test_hps_training_with_out_of_domain_evaluation_rewards(tiny_flux, tiny_clip, tiny_hps,
                                                            tmp_path, capsys):
    hps = ["--rewards", "hps", "--hps-checkpoint", tiny_hps[0], "--hps-model", tiny_hps[1]]
    base = train_args(tiny_flux, tiny_clip, tmp_path / "a", "--iterations", "2", "--lora-rank",
                      "4", "--eval", "--eval-seeds", "0", *hps)
    _, evals = trainer.main(base + ["--eval-rewards", "hps,clip,pickscore", "--pickscore-model",
                                    tiny_clip, "--pickscore-processor", tiny_clip])
    out = capsys.readouterr().out
    saved = json.loads((tmp_path / "a" / "eval.json").read_text())["evaluations"]
    assert [(set(e["in_domain"]), set(e["out_of_domain"])) for e in saved] == [
        ({"hps"}, {"clip", "pickscore"})] * 2
    assert re.search(r"eval after 2 iterations: in-domain hps -?[\d.]+ \| out-of-domain clip "
                     r"-?[\d.]+  pickscore -?[\d.]+", out)
    # The scores are those rewards' own on the evaluation's samples.
    pipe = trained_pipeline(tiny_flux, tmp_path / "a" / "checkpoint", 4, 4)
    velocity = Velocity.from_pipe(pipe.transformer, pipe, H, W)
    models = rewards.load_rewards("hps,clip", "cpu", clip_model=tiny_clip,
                                  hps_checkpoint=tiny_hps[0], hps_model=tiny_hps[1])
    again, _ = trainer.evaluate(pipe, velocity, PromptEncoder(pipe, 16), models,
                                loading.BUILTIN_EVAL_PROMPTS, H, W,
                                trainer.sigma_grid(pipe, 4, H, W, "pipeline"), [0])
    assert again == pytest.approx({**saved[-1]["in_domain"], "clip": saved[-1]["out_of_domain"]
                                   ["clip"]}, rel=1e-5)
    # Out-of-domain rewards only watch: the same training without them.
    trainer.main(base[:base.index(str(tmp_path / "a"))] + [str(tmp_path / "b")]
                 + base[base.index(str(tmp_path / "a")) + 1:])
    drop = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]
    assert drop(metrics_rows(tmp_path / "a")) == drop(metrics_rows(tmp_path / "b"))
    weights = [checkpoint(tmp_path / run / "checkpoint")["model"] for run in "ab"]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    b = json.loads((tmp_path / "b" / "eval.json").read_text())["evaluations"]
    assert [e["in_domain"] for e in b] == [e["in_domain"] for e in saved]
    assert all(e["out_of_domain"] == {} for e in b)


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed")
def test_report_to_wandb_without_wandb_is_a_clear_error(tmp_path, capsys):
    argv = train_args(str(tmp_path / "no_flux"), str(tmp_path / "no_clip"), tmp_path / "out",
                      "--report-to", "wandb")
    assert "--report-to wandb needs the wandb package: pip install wandb" in parse_error(argv,
                                                                                         capsys)


# ----------------------------------------------------------------------------------------------
# Long runs that lose nothing: output directories, kills, signals, seeds.


def metrics_rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_an_output_directory_holding_a_run_is_refused_unless_resumed_or_overwritten(
        tiny_flux, tiny_clip, tmp_path):
    args = train_args(tiny_flux, tiny_clip, tmp_path, "--iterations", "1", "--lora-rank", "4")
    trainer.main(args)
    before = files(tmp_path / "checkpoint")
    with pytest.raises(FileExistsError, match=r"already holds a run \(checkpoint, metrics.jsonl\)"
                                              r".*--resume .*--overwrite"):
        trainer.main(args)
    assert files(tmp_path / "checkpoint") == before and len(metrics_rows(tmp_path)) == 1
    trainer.main(args + ["--overwrite", "--seed", "1"])
    assert [m["iteration"] for m in metrics_rows(tmp_path)] == [0]  # replaced, not appended
    assert files(tmp_path / "checkpoint") != before
    assert not (tmp_path / ".lock").exists()  # cleared on exit


def test_one_run_at_a_time_per_directory(tmp_path):
    first = runs.RunDirectory(tmp_path)
    with pytest.raises(RuntimeError, match=f"in use by another run \\(pid {os.getpid()}\\)"):
        runs.RunDirectory(tmp_path)
    first.close()
    runs.RunDirectory(tmp_path).close()  # free again
    assert not (tmp_path / ".lock").exists()


def test_metrics_never_hold_an_iteration_twice_after_a_kill_and_resume(tiny_flux, tiny_clip,
                                                                       tmp_path):
    args = train_args(tiny_flux, tiny_clip, tmp_path, "--lora-rank", "4", "--save-every", "2")
    trainer.main(args + ["--iterations", "2"])  # checkpoint after iteration 1
    with open(tmp_path / "metrics.jsonl", "a") as f:  # a kill after logging 2 and 3, unsaved
        for it in (2, 3):
            f.write(json.dumps({"iteration": it, "reward": 0.0}) + "\n")
    trainer.main(args + ["--iterations", "4", "--resume", str(tmp_path / "checkpoint")])
    rows = metrics_rows(tmp_path)
    assert [m["iteration"] for m in rows] == [0, 1, 2, 3]
    assert all(type(m["iteration"]) is int for m in rows)
    assert rows[2]["reward"] != 0.0  # the resumed run's own row, not the stale one


def test_same_seed_gives_the_same_lora_weights(tiny_flux, tiny_clip, tmp_path):
    sd = []
    for name in ("a", "b"):
        torch.manual_seed(len(name) * 1000 + ord(name))  # a different global RNG state each time
        trainer.main(train_args(tiny_flux, tiny_clip, tmp_path / name, "--iterations", "1",
                                "--lora-rank", "4", "--seed", "3"))
        sd.append(checkpoint(tmp_path / name / "checkpoint")["model"])
    assert sd[0].keys() == sd[1].keys()
    for k in sd[0]:
        assert torch.equal(sd[0][k], sd[1][k]), k



def test_a_kill_between_the_two_renames_of_a_save_is_recovered(tiny_flux, tmp_path):
    model, opt, g = tiny_lora_state(tiny_flux)
    path = tmp_path / "checkpoint"
    checkpoints.Checkpointer(path).save(model, opt, g, 0, {"x": 1})
    path.rename(tmp_path / "checkpoint.old")  # the old one moved aside, the new one not yet in
    assert checkpoints.load_checkpoint(path, model, opt, g, {"x": 1}, seed=0) == 1
    checkpoints.Checkpointer(path).save(model, opt, g, 1, {"x": 1})
    assert checkpoint(path)["iteration"] == 1 and not (tmp_path / "checkpoint.old").exists()

@pytest.mark.parametrize("damage,message", [
    ("no_metadata", "lacks .metadata: not a finished torch.distributed.checkpoint save"),
    ("no_shard", "lacks shard file(s) __0_0.distcp (of 1)"),
    ("no_meta", "lacks g2rpo.json: not a g2rpo checkpoint"),
    ("bad_metadata", ".metadata cannot be read"),
    ("no_fields", "g2rpo.json lacks fingerprint"),
    ("legacy", "is a single file, as versions of this trainer wrote before checkpoints became"),
    ("missing", "does not exist"),
])
def test_unreadable_checkpoints_are_named(tiny_flux, tmp_path, damage, message):
    model, opt, g = tiny_lora_state(tiny_flux)
    path = tmp_path / "checkpoint"
    checkpoints.Checkpointer(path).save(model, opt, g, 0, {"x": 1})
    if damage == "no_metadata":
        (path / ".metadata").unlink()
    elif damage == "no_shard":
        (path / "__0_0.distcp").unlink()
    elif damage == "no_meta":
        (path / "g2rpo.json").unlink()
    elif damage == "bad_metadata":
        (path / ".metadata").write_bytes(b"garbage")
    elif damage == "no_fields":
        (path / "g2rpo.json").write_text(json.dumps({"iteration": 0, "world_size": 1}))
    elif damage == "legacy":
        path = tmp_path / "checkpoint.pt"
        torch.save({"model": {}}, path)
    else:
        path = tmp_path / "elsewhere"
    with pytest.raises(checkpoints.CheckpointError, match=f"checkpoint '{path}'.*"
                       f"{re.escape(message)}"):
        checkpoints.load_checkpoint(path, model, opt, g, {"x": 1}, seed=0)


def test_a_run_directory_given_to_resume_points_at_its_checkpoint(tiny_flux, tmp_path):
    model, opt, g = tiny_lora_state(tiny_flux)
    checkpoints.Checkpointer(tmp_path / "checkpoint").save(model, opt, g, 0, {"x": 1})
    with pytest.raises(checkpoints.CheckpointError,
                       match=f"is a run directory, not a checkpoint: --resume {tmp_path}/checkpoint"):
        checkpoints.find_checkpoint(tmp_path)


@pytest.mark.parametrize("what", ["weights", "optimizer state"])
def test_a_checkpoint_with_non_finite_values_is_refused(tiny_flux, tiny_clip, tmp_path, what):
    import torch.distributed.checkpoint as dcp

    trainer.main(train_args(tiny_flux, tiny_clip, tmp_path, "--iterations", "1",
                            "--lora-rank", "4"))
    ckpt = checkpoint(tmp_path / "checkpoint")
    if what == "weights":
        next(iter(ckpt["model"].values())).fill_(float("inf"))
    else:
        next(iter(ckpt["optimizer"]["state"].values()))["exp_avg"].fill_(float("nan"))
    bad = tmp_path / "bad"
    with pytest.warns(UserWarning, match="single process"):  # intended here
        dcp.save({k: ckpt[k] for k in ("model", "optimizer", "rng")}, checkpoint_id=bad,
                 no_dist=True)
    (bad / "g2rpo.json").write_bytes((tmp_path / "checkpoint" / "g2rpo.json").read_bytes())
    with pytest.raises(ValueError, match=f"checkpoint '{bad}' holds non-finite {what}"):
        trainer.main(train_args(tiny_flux, tiny_clip, tmp_path / "b", "--iterations", "2",
                                "--lora-rank", "4", "--resume", str(bad)))


def test_a_failed_save_names_the_path_and_keeps_the_state_in_a_rescue_file(tiny_flux, tmp_path,
                                                                           monkeypatch):
    from torch.distributed.checkpoint.filesystem import FileSystem

    model, opt, g = tiny_lora_state(tiny_flux)
    path = tmp_path / "run" / "checkpoint"
    real_stream = FileSystem.create_stream

    def read_only_run_dir(self, p, mode):  # every shard write in the run directory fails
        if tmp_path / "run" in Path(p).parents and "w" in mode:
            raise OSError(30, "Read-only file system")
        return real_stream(self, p, mode)

    monkeypatch.setattr(FileSystem, "create_stream", read_only_run_dir)
    with pytest.raises(OSError, match=f"could not write checkpoint '{path}': Read-only file "
                                      f"system; this iteration's state was saved to") as e:
        checkpoints.Checkpointer(path).save(model, opt, g, 4, {"x": 1})
    rescue = Path(str(e.value).split("saved to ")[1].split(" instead")[0])
    assert checkpoint(rescue)["iteration"] == 4
    assert not path.exists() and not path.with_name("checkpoint.tmp").exists()
    fresh, fresh_opt, fresh_g = tiny_lora_state(tiny_flux)
    assert checkpoints.load_checkpoint(rescue, fresh, fresh_opt, fresh_g, {"x": 1}, seed=0) == 5
    import shutil
    shutil.rmtree(rescue)


def run_in_background(args, tmp_path):
    env = {**os.environ, **SUBPROCESS_ENV, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "image_flow", *args], cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_rows(out, n, proc, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (out / "metrics.jsonl").exists() and len(metrics_rows(out)) >= n:
            return
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.05)
    raise TimeoutError(f"no {n} metrics rows in {timeout} s")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_or_ctrl_c_finishes_the_iteration_saves_and_exits_0(tiny_flux, tiny_clip,
                                                                    tmp_path, sig):
    out = tmp_path / "run"
    args = train_args(tiny_flux, tiny_clip, out, "--iterations", "500", "--save-every", "1000",
                      "--lora-rank", "4")
    proc = run_in_background(args, tmp_path)
    wait_for_rows(out, 1, proc)
    proc.send_signal(sig)
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, stdout[-3000:]
    assert f"stopped by {sig.name} after iteration" in stdout
    assert f"--resume {out / 'checkpoint'}" in stdout
    last = metrics_rows(out)[-1]["iteration"]
    assert [m["iteration"] for m in metrics_rows(out)] == list(range(last + 1))
    assert checkpoint(out / "checkpoint")["iteration"] == last < 499
    assert not (out / ".lock").exists()


def test_a_second_ctrl_c_stops_at_once_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    said = []
    with pytest.raises(KeyboardInterrupt):
        with runs.GracefulStop(log=said.append) as stop:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)  # the handler runs in the main thread between bytecodes
            assert stop.requested == "SIGINT" and stop.should_stop(1)
            assert "SIGINT received: finishing this iteration" in said[0]
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loading_model_by_model_gives_what_the_pipelines_own_loading_gives(tiny_flux, dtype):
    # Each component read onto the device on its own: the same classes, weights and dtypes
    # (T5's float32 layers included) as FluxPipeline.from_pretrained, frozen and in eval mode.
    from diffusers import FluxPipeline

    ours = loading.load_pipeline(tiny_flux, dtype=dtype)
    theirs = FluxPipeline.from_pretrained(tiny_flux, torch_dtype=dtype)
    assert ours.components.keys() == theirs.components.keys()
    for name, module in theirs.components.items():
        assert type(ours.components[name]) is type(module), name
        if isinstance(module, torch.nn.Module):
            mine, want = ours.components[name].state_dict(), module.state_dict()
            assert mine.keys() == want.keys(), name
            for k, v in want.items():
                assert mine[k].dtype == v.dtype and torch.equal(mine[k], v), (name, k)
            assert not ours.components[name].training
            assert not any(p.requires_grad for p in ours.components[name].parameters())


def test_loading_benchmark_reports_each_process_against_what_it_loaded(tmp_path):
    env = {**os.environ, **SUBPROCESS_ENV}
    r = subprocess.run([sys.executable, "-m", "benchmarks.loading", "--procs", "1", "--layers",
                        "1,1"], capture_output=True, text=True, timeout=300, env=env,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [line.split() for line in r.stdout.splitlines() if line.startswith("    1 ")]
    assert [row[1] for row in rows] == ["0"]  # one row per process
    loaded, before, peak, extra, ratio = (float(x) for x in rows[0][2:3] + rows[0][4:8])
    # Onto the CPU the weights stay memory-mapped until used: loading adds well under one copy.
    assert loaded > 10 and peak >= before and abs(extra - (peak - before)) <= 1 and extra < loaded


def test_checkpoint_memory_benchmark_runs_and_reports_each_process(tmp_path):
    env = {**os.environ, **SUBPROCESS_ENV}
    r = subprocess.run([sys.executable, "-m", "benchmarks.checkpoint", "--procs", "2",
                        "--layers", "1,1", "--heads", "2"], capture_output=True, text=True,
                       timeout=300, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [line.split() for line in r.stdout.splitlines() if line.startswith("    2 ")]
    assert [row[1] for row in rows] == ["0", "1"]  # one row per process
    for row in rows:
        save_before, save_peak, load_before, load_peak = (float(row[i]) for i in (6, 7, 11, 12))
        assert save_peak >= save_before > 0 and load_peak >= load_before > 0
