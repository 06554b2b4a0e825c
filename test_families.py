"""Every family beside FLUX.1 (test_flux_flow.py), offline, on a tiny random pipeline built from
configs and loaded back through from_pretrained: the family's own diffusers pipeline is the
oracle for its conventions (timestep, latent layout, σ grid, conditioning, guidance form); then
LoRA and full fine-tune runs, exports that diffusers loads, resume, torchrun.
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

import families
import g2rpo
import image_flow
from test_flux_flow import (HERE, H, W, assert_resume_is_bit_exact, checkpoint, clip_tokenizer,
                            train_args)



@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run ~10× faster on one thread of a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_vae(latent_channels, **kw):
    """The tests' VAE: 8× downsampling (four blocks), 1-channel latents."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=(4, 4, 4, 4),
        layers_per_block=1, latent_channels=latent_channels, norm_num_groups=1, sample_size=32,
        use_quant_conv=False, use_post_quant_conv=False, **kw).eval()


def t5_tokenizer():
    import string

    from transformers import T5Tokenizer

    vocab = ([("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
             + [("▁" + c, -1.0) for c in string.ascii_lowercase]
             + [(c, -2.0) for c in string.ascii_lowercase])
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)


def make_tiny_sd3(path, dynamic_shift=False):
    from diffusers import (FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from transformers import (CLIPTextConfig, CLIPTextModelWithProjection, T5Config,
                              T5EncoderModel)

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=4, patch_size=2, in_channels=1, out_channels=1, num_layers=2,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
        caption_projection_dim=16, pooled_projection_dim=64, pos_embed_max_size=8).eval()

    def clip():
        return CLIPTextModelWithProjection(CLIPTextConfig(
            bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=16, intermediate_size=37,
            num_attention_heads=2, num_hidden_layers=2, vocab_size=64, projection_dim=32,
            max_position_embeddings=77)).eval()

    t5 = T5EncoderModel(T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=37, num_layers=2,
                                 num_heads=4, decoder_start_token_id=0, pad_token_id=0,
                                 eos_token_id=1)).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=1.0 if dynamic_shift else 3.0, use_dynamic_shifting=dynamic_shift,
        base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.5, max_shift=1.15)
    StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler,
        vae=tiny_vae(1, shift_factor=0.0609, scaling_factor=1.5035),
        text_encoder=clip(), tokenizer=clip_tokenizer(), text_encoder_2=clip(),
        tokenizer_2=clip_tokenizer(), text_encoder_3=t5,
        tokenizer_3=t5_tokenizer()).save_pretrained(path)
    return str(path)


# Each family: its builder and the guidance scale its tests train with (both rows when it has
# classifier-free guidance).
FAMILIES = {"sd3": (make_tiny_sd3, 4.5)}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def tiny(request, tmp_path_factory):
    """(family key, saved tiny pipeline folder)."""
    make, _ = FAMILIES[request.param]
    return request.param, make(tmp_path_factory.mktemp(request.param))


def pipeline_call(pipe, prompts, guidance, steps=5, **kw):
    """The family's own pipeline, η = 0, latent or pt output."""
    return pipe(prompts, generator=torch.Generator().manual_seed(0), height=H, width=W,
                num_inference_steps=steps, guidance_scale=guidance, max_sequence_length=16,
                **kw).images


def ours(pipe, prompts, guidance, steps=5, negative=""):
    """Our η = 0 sampler (g2rpo.ode_step) on the pipeline's own σ grid."""
    family = families.family_of(pipe)
    velocity = image_flow.Velocity.from_pipe(pipe.transformer, pipe, H, W, guidance)
    encoder = image_flow.PromptEncoder(pipe, 16, negative if family.uses_negative(guidance)
                                       else None)
    return image_flow.sample(pipe, velocity, encoder, prompts, H, W,
                             image_flow.sigma_grid(pipe, steps, H, W, "pipeline"),
                             torch.Generator().manual_seed(0))


# ----------------------------------------------------------------------------------------------
# The pipeline is the oracle.


@pytest.mark.parametrize("cfg", [False, True], ids=["no-guidance", "guidance"])
@pytest.mark.parametrize("dynamic_shift", [False, True], ids=["static-shift", "dynamic-shift"])
def test_eta_zero_sampler_equals_the_family_pipeline(tmp_path, cfg, dynamic_shift):
    for key, (make, guidance) in FAMILIES.items():
        pipe = image_flow.load_pipeline(make(tmp_path / key, dynamic_shift=dynamic_shift))
        w = guidance if cfg else 1.0
        assert families.family_of(pipe).uses_negative(w) == cfg
        prompts = ["a red fox", "a lighthouse in a storm"]
        latents, images = ours(pipe, prompts, w)
        ref = pipeline_call(pipe, prompts, w, output_type="latent")
        torch.testing.assert_close(latents, ref.float(), rtol=1e-4, atol=1e-5)
        ref_images = pipeline_call(pipe, prompts, w, output_type="pt")
        torch.testing.assert_close(images, ref_images.float(), rtol=1e-4, atol=1e-5)


def test_the_oracle_catches_a_wrong_guidance_form_or_timestep(tiny, monkeypatch):
    """Z-Image's form pos + w·(pos − neg), or FLUX's σ timestep, in place of this family's:
    the pipeline comparison above would fail."""
    key, folder = tiny
    pipe = image_flow.load_pipeline(folder)
    family, guidance = families.family_of(pipe), FAMILIES[key][1]
    prompts = ["a red fox"]
    ref = pipeline_call(pipe, prompts, guidance, output_type="latent").float()
    torch.testing.assert_close(ours(pipe, prompts, guidance)[0], ref, rtol=1e-4, atol=1e-5)
    with monkeypatch.context() as m:
        m.setattr(type(family), "guide", lambda self, c, u, w: c + w * (c - u))
        assert (ours(pipe, prompts, guidance)[0] - ref).abs().max() > 1e-3
    with monkeypatch.context() as m:
        m.setattr(type(family), "constant_inputs",
                  lambda self, *a: {"num_train_timesteps": 1})
        assert (ours(pipe, prompts, guidance)[0] - ref).abs().max() > 1e-3
    # The negative prompt is the unconditional row's.
    other = pipeline_call(pipe, prompts, guidance, output_type="latent",
                          negative_prompt="blurry").float()
    torch.testing.assert_close(ours(pipe, prompts, guidance, negative="blurry")[0], other,
                               rtol=1e-4, atol=1e-5)
    assert (other - ref).abs().max() > 1e-4


def test_guidance_rows_go_through_the_transformer_in_one_call(tiny):
    key, folder = tiny
    pipe = image_flow.load_pipeline(folder)
    calls = []
    hook = pipe.transformer.register_forward_hook(
        lambda m, args, kwargs, out: calls.append(kwargs["hidden_states"].shape[0]),
        with_kwargs=True)
    ours(pipe, ["a cat", "a dog", "a fox"], FAMILIES[key][1], steps=3)
    assert calls == [6, 6, 6]  # 3 prompts × (conditional, unconditional), once per step
    calls.clear()
    ours(pipe, ["a cat", "a dog", "a fox"], 1.0, steps=3)
    assert calls == [3, 3, 3]  # guidance off: one row per sample
    hook.remove()


def test_image_size_and_guidance_are_checked(tiny):
    _, folder = tiny
    pipe = image_flow.load_pipeline(folder)
    multiple = families.family_of(pipe).image_multiple(pipe)
    with pytest.raises(ValueError, match=f"height must be a positive multiple of {multiple}"):
        image_flow.latent_shape(pipe, H + multiple // 2, W)
    if type(pipe).__name__ == "StableDiffusion3Pipeline":  # 8 patches × 2 × 8 = 128 at most
        with pytest.raises(ValueError, match="width 144 is larger than this SD3 transformer"):
            image_flow.latent_shape(pipe, H, 144)


def test_a_guidance_scale_the_checkpoint_cannot_take_is_refused_before_loading(tmp_path,
                                                                             tiny_clip, capsys):
    from test_flux_flow import make_tiny_flux, parse_error

    schnell_like = make_tiny_flux(tmp_path / "flux", guidance_embeds=False)
    args = train_args(schnell_like, tiny_clip, tmp_path / "out", "--iterations", "1")
    assert ("--guidance 3.5: this FLUX.1 checkpoint has no guidance embedding" in
            parse_error(args + ["--guidance", "3.5"], capsys))
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------
# Training through the shared trainer.


def family_args(folder, clip, out, key, *extra):
    return train_args(folder, clip, out, "--guidance", str(FAMILIES[key][1]), *extra)


@pytest.mark.parametrize("lora_rank", ["4", "0"], ids=["lora", "full"])
def test_a_short_run_trains_with_guidance_rows(tiny, tiny_clip, tmp_path, lora_rank, capsys):
    key, folder = tiny
    history, evals = image_flow.main(family_args(folder, tiny_clip, tmp_path, key, "--iterations",
                                                 "2", "--lora-rank", lora_rank, "--eval"))
    out = capsys.readouterr().out
    assert "(2 transformer rows per sample)" in out
    for m in history:
        for k in ("reward", "reward_std", "loss", "clip_frac", "approx_kl", "grad_norm"):
            assert math.isfinite(m[k]), (k, m[k])
        assert m["ratio_dev_first"] < 1e-5  # log π_old and log π: the same guided velocity
    assert history[0]["reward_std"] > 0  # rewards computed on decoded images, and they differ
    assert [e["iteration"] for e in evals] == [0, 2]
    saved = checkpoint(tmp_path / "checkpoint")
    original = dict(image_flow.load_pipeline(folder).transformer.named_parameters())
    if lora_rank == "4":
        assert saved["model"] and all("lora" in k for k in saved["model"])
        assert any(v.abs().max() > 0 for k, v in saved["model"].items() if "lora_B" in k)
    else:
        assert set(saved["model"]) == set(original)
        assert any(not torch.equal(v, original[k]) for k, v in saved["model"].items())
    assert saved["fingerprint"]["guidance"] == FAMILIES[key][1]


def trained(folder, ckpt, lora_rank):
    pipe = image_flow.load_pipeline(folder)
    image_flow.setup_trainable(pipe.transformer, lora_rank, max(lora_rank, 1))
    assert not pipe.transformer.load_state_dict(checkpoint(ckpt)["model"],
                                                strict=False).unexpected_keys
    return pipe


def assert_same_samples(loaded, rebuilt, base, guidance):
    """The pipeline loaded from the export samples (through its own __call__) what our sampler
    gives with the trained weights, and not what the base model gives."""
    prompts = ["a red fox", "a lighthouse"]
    ref = pipeline_call(loaded, prompts, guidance, output_type="latent").float()
    torch.testing.assert_close(ours(rebuilt, prompts, guidance)[0], ref, rtol=1e-4, atol=1e-5)
    assert (ours(base, prompts, guidance)[0] - ref).abs().max() > 1e-6


def test_exported_lora_loads_with_the_pipelines_load_lora_weights(tiny, tiny_clip, tmp_path):
    key, folder = tiny
    image_flow.main(family_args(folder, tiny_clip, tmp_path, key, "--iterations", "1",
                                "--lora-rank", "4", "--lr", "3e-2"))
    loaded = image_flow.load_pipeline(folder)
    loaded.load_lora_weights(str(tmp_path / "lora"))
    assert_same_samples(loaded, trained(folder, tmp_path / "checkpoint", 4),
                        image_flow.load_pipeline(folder), FAMILIES[key][1])


def test_exported_full_transformer_loads_with_the_familys_transformer_class(tiny, tiny_clip,
                                                                            tmp_path):
    import diffusers

    key, folder = tiny
    image_flow.main(family_args(folder, tiny_clip, tmp_path, key, "--iterations", "1",
                                "--lora-rank", "0"))
    index = json.loads((tmp_path / "transformer" / "config.json").read_text())
    cls = getattr(diffusers, index["_class_name"])
    loaded = image_flow.load_pipeline(folder)
    loaded.transformer = cls.from_pretrained(str(tmp_path / "transformer")).eval()
    assert_same_samples(loaded, trained(folder, tmp_path / "checkpoint", 0),
                        image_flow.load_pipeline(folder), FAMILIES[key][1])


def test_resume_is_bit_exact(tiny, tiny_clip, tmp_path):
    key, folder = tiny
    assert_resume_is_bit_exact(folder, tiny_clip, tmp_path, "--guidance", str(FAMILIES[key][1]),
                               "--lora-rank", "0", "--kl-beta", "0.1")


def test_resume_with_another_guidance_or_negative_prompt_is_refused(tiny, tiny_clip, tmp_path,
                                                                    capsys):
    key, folder = tiny
    args = family_args(folder, tiny_clip, tmp_path, key, "--iterations", "1", "--lora-rank", "4")
    image_flow.main(args)
    capsys.readouterr()
    resume = ["--iterations", "2", "--resume", str(tmp_path / "checkpoint")]
    for extra, field in ((["--guidance", "2"], "guidance"),
                         (["--negative-prompt", "blurry"], "negative_prompt")):
        with pytest.raises(SystemExit):
            image_flow.main(args + extra + resume)
        assert f"differs in: {field}" in capsys.readouterr().err


@pytest.mark.parametrize("lora_rank", ["4", "0"], ids=["ddp-lora", "fsdp2-full"])
def test_torchrun_two_processes_keep_ranks_identical(tiny, tiny_clip, tmp_path, lora_rank):
    key, folder = tiny
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(29600 + int(lora_rank) + os.getpid() % 1000),
           str(HERE / "image_flow.py"),
           *family_args(folder, tiny_clip, out, key, "--iterations", "2", "--lora-rank",
                        lora_rank)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=HERE)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    sums = json.loads((out / "rank_checksums.json").read_text())
    assert len(sums) == 2 and sums[0] == sums[1]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in metrics] == [0, 1]
    assert all(math.isfinite(m["loss"]) and m["ratio_dev_first"] < 1e-5 for m in metrics)
    assert len(sorted((out / "checkpoint").glob("*.distcp"))) == 2
