"""The image trainer on a CUDA GPU: the checks the CPU tests cannot make. Skipped without CUDA.

    python -m pytest -q -m gpu          # on one H100 / H200: about 3 minutes (H200, before the
                                        # KL / EMA tests were added)

The failure these guard against: cuDNN fused attention's bf16 backward, PyTorch's default on
Hopper GPUs, gave NaN/inf gradients (tiny model) and illegal memory accesses (full size) at
branch step 0. `G2RPO_GPU_TEST_DEVICE=cpu python -m pytest -q -m gpu` runs the same code on a CPU
(the full-size case then uses the tiny architecture): a check of the tests, not of the GPU.
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

import g2rpo
from benchmarks import image_iteration
from conftest import gpu_test_device
from image_flow import attention, flags, loading, rewards, trainer
from image_flow.families import family_for
from image_flow.tiny import make_tiny_open_clip
from image_flow.prompts import PromptEncoder
from image_flow.velocity import Velocity
from test_image_flow import (ROOT, SUBPROCESS_ENV, H, W, assert_resume_is_bit_exact, checkpoint,
                             train_args)

pytestmark = pytest.mark.gpu
DEVICE = gpu_test_device()
CUDA = DEVICE.type == "cuda"
# On a GPU the defaults are the GPU defaults (bf16); a CPU dry run must ask for bf16.
GPU_DEFAULTS = [] if CUDA else ["--dtype", "bf16"]
# bf16 sampler vs FluxPipeline in bf16: the pipeline rounds its latents to bf16 after every step,
# ours keeps them in fp32, so they agree to bf16 precision only.
BF16_TOL = dict(rtol=0.05, atol=0.05)


def test_gpu_rewards_score_on_the_device_as_on_the_cpu(tiny_hps, tiny_clip, tmp_path):
    from test_rewards import smooth_images

    models = dict(clip_model=make_tiny_open_clip(tmp_path / "dfn"), pickscore_model=tiny_clip,
                  pickscore_processor=tiny_clip, hps_checkpoint=tiny_hps[0],
                  hps_model=tiny_hps[1])
    images, prompts = smooth_images(4, 64, 64), ["a cat", "a dog", "a cat", "sun"]
    cpu = rewards.load_rewards("hps,clip,pickscore", "cpu", **models)
    dev = rewards.load_rewards("hps,clip,pickscore", DEVICE, **models)
    for name in cpu:
        got = dev[name](images.to(DEVICE), prompts)
        assert got.device.type == DEVICE.type
        torch.testing.assert_close(got.cpu(), cpu[name](images, prompts), atol=1e-4, rtol=1e-4)


def test_gpu_default_dtype_is_bf16(tiny_flux):
    if CUDA:
        assert flags.parse_args(["--model", tiny_flux]).dtype is None  # → bf16 on cuda
    assert attention.DEFAULT_ATTENTION == ("flash", "efficient", "math")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_eta_zero_sampler_equals_flux_pipeline(tiny_flux, dtype):
    pipe = loading.load_pipeline(tiny_flux, DEVICE, dtype)
    prompts = ["a red fox", "a lighthouse"]
    kw = dict(height=H, width=W, num_inference_steps=5, guidance_scale=3.5, max_sequence_length=16)
    gen = lambda: torch.Generator(DEVICE).manual_seed(0)
    ref = pipe(prompts, generator=gen(), output_type="latent", **kw).images.float()
    ref_images = pipe(prompts, generator=gen(), output_type="pt", **kw).images.float()
    sigmas = trainer.sigma_grid(pipe, 5, H, W, schedule="pipeline")
    velocity = Velocity.from_pipe(pipe.transformer, pipe, H, W, 3.5, dtype)
    latents, images = trainer.sample(pipe, velocity, PromptEncoder(pipe, 16), prompts,
                                     H, W, sigmas, gen())
    assert latents.device.type == DEVICE.type and latents.abs().max() > 0
    tol = {} if dtype == torch.float32 else BF16_TOL
    torch.testing.assert_close(latents, ref, **tol)
    torch.testing.assert_close(images, ref_images, **tol)


@pytest.mark.parametrize("lora_rank", ["4", "0"])
def test_gpu_two_iterations_train_with_finite_gradients(tiny_flux, tiny_clip, tmp_path,
                                                        lora_rank):
    history, _ = trainer.main(train_args(tiny_flux, tiny_clip, tmp_path, "--iterations", "2",
                                         "--lora-rank", lora_rank, *GPU_DEFAULTS))
    assert len(history) == 2
    for m in history:
        for k in ("loss", "grad_norm", "clip_frac", "approx_kl", "reward"):
            assert torch.isfinite(torch.tensor(m[k])), (k, m[k])
        assert m["grad_norm"] > 0
        assert m["ratio_dev_first"] < 1e-2  # bf16 sampling pass vs training pass
    saved = checkpoint(tmp_path / "checkpoint")["model"]
    original = loading.load_pipeline(tiny_flux).transformer.state_dict()
    if lora_rank != "0":
        assert any(v.abs().max() > 0 for k, v in saved.items() if "lora_B" in k)  # B starts at 0
    else:
        assert any(not torch.equal(saved[k], original[k].float()) for k in saved)


@pytest.mark.parametrize("lora_rank", ["4", "0"])
def test_gpu_kl_to_the_reference_and_ema_train_with_finite_values(tiny_flux, tiny_clip, tmp_path,
                                                                  lora_rank):
    """LoRA: the reference is the adapter switched off (peft); full: a bf16 frozen copy."""
    history, _ = trainer.main(train_args(tiny_flux, tiny_clip, tmp_path, "--iterations", "2",
                                         "--lora-rank", lora_rank, "--kl-beta", "0.1",
                                         "--ema-decay", "0.9", *GPU_DEFAULTS))
    for m in history:
        for k in ("loss", "grad_norm", "kl_ref"):
            assert torch.isfinite(torch.tensor(m[k])), (k, m[k])
    assert history[1]["kl_ref"] > 0
    saved = checkpoint(tmp_path / "checkpoint")
    assert saved["ema"].keys() == saved["model"].keys()
    assert all(torch.isfinite(v).all() for v in saved["ema"].values())


def test_gpu_resume_is_bit_exact(tiny_flux, tiny_clip, tmp_path):
    assert_resume_is_bit_exact(tiny_flux, tiny_clip, tmp_path, "--lora-rank", "0",
                               "--dtype", "fp32")


def test_gpu_torchrun_over_the_visible_gpus_keeps_ranks_identical(tiny_flux, tiny_clip,
                                                                  tmp_path):
    nproc = torch.cuda.device_count() if CUDA else 1
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(29700 + os.getpid() % 1000), "-m", "image_flow",
           *train_args(tiny_flux, tiny_clip, out, "--iterations", "2", "--lora-rank", "4",
                       *GPU_DEFAULTS)]
    env = {**os.environ, **SUBPROCESS_ENV}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"{nproc} process(es) ({'nccl' if CUDA else 'gloo'})" in r.stdout
    sums = json.loads((out / "rank_checksums.json").read_text())
    assert len(sums) == nproc and len(set(sums)) == 1
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor([m["loss"], m["grad_norm"]])).all() for m in metrics)


def test_gpu_sharded_checkpoints_async_save_export_and_elastic_resume(tiny_flux, tiny_clip,
                                                                      tmp_path):
    """FSDP2 full fine-tune over the visible GPUs (nccl; async_save's gloo side group) with an
    evaluation before and after every iteration (inside the EMA's swap), then a one-process
    resume: elastic when more than one GPU wrote the checkpoint."""
    nproc = torch.cuda.device_count() if CUDA else 1
    out = tmp_path / "run"
    args = train_args(tiny_flux, tiny_clip, out, "--lora-rank", "0", "--kl-beta", "0.1",
                      "--ema-decay", "0.9", *GPU_DEFAULTS)  # a sharded reference and EMA
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(29800 + os.getpid() % 1000), "-m", "image_flow",
           *args, "--iterations", "2", "--save-every", "1", "--async-save", "--eval-every", "1",
           "--eval-seeds", "0"]
    env = {**os.environ, **SUBPROCESS_ENV}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    evals = json.loads((out / "eval.json").read_text())["evaluations"]
    assert [e["iteration"] for e in evals] == [0, 1, 2]
    assert all(math.isfinite(v) for e in evals for d in ("in_domain", "out_of_domain")
               for v in e[d].values())
    saved = checkpoint(out / "checkpoint")
    assert saved["iteration"] == 1 and saved["world_size"] == nproc
    assert len(list((out / "checkpoint").glob("*.distcp"))) == nproc
    from safetensors.torch import load_file

    exported = load_file(out / "transformer" / "diffusion_pytorch_model.safetensors")
    for k, v in exported.items():  # the EMA, bf16, gathered from every rank's shards
        assert v.dtype == torch.bfloat16 and torch.equal(v, saved["ema"][k].bfloat16()), k
    history, _ = trainer.main(args + ["--iterations", "3", "--resume", str(out / "checkpoint")])
    assert [m["iteration"] for m in history] == [2]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in rows] == [0, 1, 2]
    assert checkpoint(out / "checkpoint")["world_size"] == 1


def assert_training_passes_have_gradients(velocity, cond, params, shape, g, prefix=""):
    """One training pass at branch step 0 (σ = 1, pure noise) and one at step 7 (of 16, shift
    3): each gives a finite, non-zero gradient norm on `params`."""
    sigmas = g2rpo.sigma_schedule(16, 3.0).to(DEVICE)
    for k in (0, 7):
        x = torch.randn(1, 1, *shape, generator=g, device=DEVICE)  # (P, 1, *D)
        with torch.no_grad():
            v = velocity(x[:, 0], sigmas[k].view(1), cond)
            x_next, _, _, _ = g2rpo.sde_step(x[:, 0], v, sigmas[k], sigmas[k + 1], 0.7, g)
        lp = g2rpo.policy_log_prob(velocity, cond, x, x_next[:, None], sigmas[k], sigmas[k + 1],
                                   0.7)
        loss, _ = g2rpo.clipped_grpo_loss(lp, lp.detach(), torch.ones_like(lp), 1e-4)
        loss.backward()
        grads = [p.grad for p in params if p.grad is not None]
        assert grads, f"{prefix}no gradient reached the LoRA weights at branch step {k}"
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(gr.float())
                                                     for gr in grads]))
        assert torch.isfinite(norm) and norm > 0, (
            f"{prefix}gradient norm {norm.item()} at branch step {k}")
        for p in params:
            p.grad = None


def test_gpu_full_size_flux_dev_lora_gradients_are_finite_at_sigma_one_and_late():
    """The case that crashed: FLUX.1-dev's architecture (random bf16 weights), LoRA r = 64, 512²,
    one training pass at branch step 0 (σ = 1, pure noise) and one at branch step 7."""
    arch = image_iteration.FLUX_DEV if CUDA else image_iteration.TINY
    dtype = torch.bfloat16
    transformer = image_iteration.build_transformer(arch, DEVICE, dtype)
    params = trainer.setup_trainable(transformer, 64, 64)
    g = torch.Generator(DEVICE).manual_seed(0)
    img_ids, cond = image_iteration.random_inputs(arch, 512, DEVICE, g)
    constant = {"img_ids": img_ids.to(dtype), "guidance_embeds": True}
    velocity = Velocity(transformer, family_for("FluxPipeline"), constant, 3.5, dtype,
                        device_type=DEVICE.type)
    assert_training_passes_have_gradients(velocity, cond, params, (1024, arch["in_channels"]),
                                          g)


@pytest.mark.parametrize("name", [n for n in image_iteration.ARCHS if n != "flux.1-dev"])
def test_gpu_full_size_training_pass_of_each_family(name):
    """Each family's released transformer architecture (random bf16 weights), LoRA r = 64 on its
    default targets, 512²: one training pass at branch step 0 (σ = 1) and one at step 7, with
    finite gradients, under the default attention backends (no cuDNN)."""
    arch = image_iteration.ARCHS[name]
    config = arch.config if CUDA else arch.tiny
    dtype = torch.bfloat16
    transformer = image_iteration.build_transformer(config, DEVICE, dtype, arch.transformer)
    g = torch.Generator(DEVICE).manual_seed(0)
    family, shape, constant, cond = image_iteration.family_setup(name, transformer, config, 512,
                                                            DEVICE, g)
    params = trainer.setup_trainable(transformer, 64, 64, lora_targets=family.lora_targets)
    velocity = Velocity(transformer, family, constant, family.guidance.off, dtype,
                        device_type=DEVICE.type)  # one row per sample: guidance off
    assert_training_passes_have_gradients(velocity, cond, params, shape, g, f"{name}: ")
    del transformer, params
    if CUDA:
        torch.cuda.empty_cache()
