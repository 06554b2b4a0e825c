"""Benchmark: --plan for each released checkpoint, from configs alone (no weights, no download).

    python -m benchmarks.memory_plan          # the table of docs/families.md (~1 min on 2 cores)

For each released checkpoint a folder holding only its configs is written (model_index.json,
the transformer's from benchmarks/image_iteration.py's ARCHS, the VAE's and the text encoders'
written out below from the released config.json files' hyper-parameters), and the image
trainer's memory plan (image_flow/plan.py) is printed for two set-ups with the paper's reward
(HPS-v2.1): LoRA rank 64 on one GPU, and a full fine-tune on 8 GPUs (FSDP2), bf16 compute. The
figures are what each process holds besides activations; the text encoders are freed before
training; "set-up" is the device while they encode the prompts, with the whole transformer as
loaded (in bf16, before FSDP2 shards it) and before any optimizer state exists.
"""

import argparse
import contextlib
import io
import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch

from benchmarks.image_iteration import ARCHS

CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77, vocab_size=49408,
              projection_dim=768)
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
              num_attention_heads=20, max_position_embeddings=77, vocab_size=49408,
              projection_dim=1280)
T5_XXL = dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, vocab_size=32128,
              feed_forward_proj="gated-gelu")
QWEN3_4B = dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                tie_word_embeddings=True)
QWEN25_VL_7B = dict(
    text_config=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                     num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                     rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}),
    vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                       out_hidden_size=3584, patch_size=14, spatial_merge_size=2,
                       temporal_patch_size=2),
    hidden_size=3584, vocab_size=152064, tie_word_embeddings=False)
FLUX_VAE = ("AutoencoderKL", dict(
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=16,
    scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
    use_post_quant_conv=False))
SD3_VAE = ("AutoencoderKL", {**FLUX_VAE[1], "scaling_factor": 1.5305, "shift_factor": 0.0609})

# checkpoint → (ARCHS key, VAE, {text encoder: (transformers class, config class, kwargs)}).
RELEASED = {
    "FLUX.1-dev": ("flux.1-dev", FLUX_VAE, {
        "text_encoder": ("CLIPTextModel", "CLIPTextConfig", CLIP_L),
        "text_encoder_2": ("T5EncoderModel", "T5Config", T5_XXL)}),
    "SD3.5-Medium": ("sd3.5-medium", SD3_VAE, {
        "text_encoder": ("CLIPTextModelWithProjection", "CLIPTextConfig", CLIP_L),
        "text_encoder_2": ("CLIPTextModelWithProjection", "CLIPTextConfig", CLIP_G),
        "text_encoder_3": ("T5EncoderModel", "T5Config", T5_XXL)}),
    "SD3.5-Large": ("sd3.5-large", SD3_VAE, {
        "text_encoder": ("CLIPTextModelWithProjection", "CLIPTextConfig", CLIP_L),
        "text_encoder_2": ("CLIPTextModelWithProjection", "CLIPTextConfig", CLIP_G),
        "text_encoder_3": ("T5EncoderModel", "T5Config", T5_XXL)}),
    "Qwen-Image": ("qwen-image", ("AutoencoderKLQwenImage", dict(
        base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
        temperal_downsample=[False, True, True])), {
        "text_encoder": ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLConfig",
                         QWEN25_VL_7B)}),
    "FLUX.2-klein-4B": ("flux2-klein-4b", ("AutoencoderKLFlux2", {}), {
        "text_encoder": ("Qwen3ForCausalLM", "Qwen3Config", QWEN3_4B)}),
    "Z-Image-Turbo": ("z-image-turbo", FLUX_VAE, {
        "text_encoder": ("Qwen3Model", "Qwen3Config", QWEN3_4B)}),
}


def write_configs(folder, name):
    """A checkpoint folder of configs only, as save_pretrained lays them out."""
    import diffusers
    import transformers

    key, (vae_cls, vae_kwargs), encoders = RELEASED[name]
    arch = ARCHS[key]
    folder = Path(folder)
    index = {"_class_name": arch.pipeline, "_diffusers_version": diffusers.__version__,
             "transformer": ["diffusers", arch.transformer], "vae": ["diffusers", vae_cls],
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}
    with torch.device("meta"):
        getattr(diffusers, arch.transformer)(**arch.config).save_config(folder / "transformer")
        getattr(diffusers, vae_cls)(**vae_kwargs).save_config(folder / "vae")
    # FLUX.1-dev's scheduler for all (the plan's figures do not depend on it): the base recipe.
    diffusers.FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256, max_image_seq_len=4096,
        base_shift=0.5, max_shift=1.15).save_config(folder / "scheduler")
    for component, (cls, config_cls, kwargs) in encoders.items():
        index[component] = ["transformers", cls]
        getattr(transformers, config_cls)(**kwargs).save_pretrained(folder / component)
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return str(folder)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.memory_plan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoints", default=",".join(RELEASED),
                   help="comma-separated names of the checkpoints to plan")
    args = p.parse_args(argv)
    from image_flow import flags, plan

    names = args.checkpoints.split(",")
    table = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            folder = write_configs(Path(tmp) / name, name)
            row = [name]
            for extra, world in ((["--lora-rank", "64"], 1), (["--lora-rank", "0"], 8)):
                with contextlib.redirect_stdout(io.StringIO()):  # the recipe's line
                    a = flags.parse_args(["--model", folder, "--rewards", "hps", "--hps-model",
                                          "ViT-H-14", "--output-dir", str(Path(tmp) / "run"),
                                          "--plan", str(world), *extra])
                rows = {what: b for what, b, _ in plan.plan(a, world)}
                if world == 1:
                    row += [rows["transformer, frozen"], sum(
                        b for what, b in rows.items() if "while encoding" in what)]
                    per_prompt = rows["prompt embeddings (host)"] / a.batch_size
                row += [rows["on the device, training"], rows["on the device, set-up"]]
            table.append(row + [per_prompt])
    print(f"torch {torch.__version__}; per process, bf16 compute, HPS-v2.1 reward, activations "
          f"not included; set-up: while the text encoders are loaded")
    print(f"{'checkpoint':<18}{'transformer':>12}{'text enc.':>11}"
          f"{'LoRA 1 GPU':>12}{'set-up':>9}{'full, 8 GPUs':>14}{'set-up':>9}"
          f"{'prompt MB':>11}{'25k prompts':>13}")
    for name, transformer, encoders, lora, lora_setup, full, full_setup, prompt in table:
        print(f"{name:<18}" + "".join(f"{v / 1e9:>{w}.1f}" for v, w in (
            (transformer, 12), (encoders, 11), (lora, 12), (lora_setup, 9), (full, 14),
            (full_setup, 9))) + f"{prompt / 1e6:>11.2f}{25_000 * prompt / 1e9:>13.0f}")
    print("(GB; transformer: its bf16 weights; LoRA: rank 64 on the family's targets; full: "
          "FSDP2, float32 weights, gradients and AdamW moments sharded over 8; prompt: one "
          "prompt's rows in the prompt cache at the default text length, at most for the "
          "families whose rows keep each prompt's own length (Qwen-Image, Z-Image))")
    return table


if __name__ == "__main__":
    main()
