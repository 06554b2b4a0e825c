"""Tiny random pipelines of every family, and tiny reward models: what tests, benchmarks and a
smoke test of an install share. Every model is built from a config with random weights (nothing
is downloaded) and saved with save_pretrained, so it loads through the real from_pretrained code.

    python -m image_flow.tiny sd3 /tmp/tiny          # writes /tmp/tiny/sd3 and /tmp/tiny/clip,
                                                     # then prints the command that trains on them
    python -m image_flow.tiny sd3 /tmp/tiny --train  # and runs it: 2 iterations of the trainer

The images are 32×32 (an 8× VAE, 2×2 patches: a handful of tokens); the text encoders have a
vocabulary of letters (byte-level for the Qwen-based ones).
"""

import argparse
import json
import string
from pathlib import Path

import torch

# ----------------------------------------------------------------------------------------------
# Shared parts: tokenizers and a VAE.


def clip_tokenizer():
    """A CLIPTokenizer whose vocabulary is the 26 letters (no merges)."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def t5_tokenizer():
    from transformers import T5Tokenizer

    vocab = ([("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
             + [("▁" + c, -1.0) for c in string.ascii_lowercase]
             + [(c, -2.0) for c in string.ascii_lowercase])
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)


def byte_chars():
    """The 256 characters a byte-level BPE vocabulary (GPT-2's, Qwen2's) writes bytes as."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {b: b for b in printable}, iter(range(256, 512))
    return [chr(chars[b] if b in chars else next(extra)) for b in range(256)]


def qwen_tokenizer(path):
    """A byte-level Qwen2Tokenizer (every byte one token, no merges) with the chat template's
    special tokens. transformers 5 ignores vocab/merges files passed to the constructor: they
    are written and loaded with from_pretrained."""
    from transformers import Qwen2Tokenizer

    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.json").write_text(json.dumps({c: i for i, c in enumerate(byte_chars())}))
    (path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = Qwen2Tokenizer.from_pretrained(str(path), unk_token=None, bos_token=None,
                                               eos_token="<|endoftext|>",
                                               pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return tokenizer


def chat_tokenizer(path):
    """The byte-level tokenizer with a chat template (FLUX.2 [klein] and Z-Image apply one)."""
    tokenizer = qwen_tokenizer(path)
    tokenizer.chat_template = (  # Qwen3's shape, without the thinking block
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return tokenizer


def tiny_vae(latent_channels, **kw):
    """The tests' VAE: 8× downsampling (four blocks), 1-channel latents."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=(4, 4, 4, 4),
        layers_per_block=1, latent_channels=latent_channels, norm_num_groups=1, sample_size=32,
        use_quant_conv=False, use_post_quant_conv=False, **kw).eval()


# ----------------------------------------------------------------------------------------------
# One pipeline per family.


def make_tiny_flux(path, guidance_embeds=True, dynamic_shift=True):
    """A tiny FluxPipeline saved in `path` (guidance_embeds: FLUX.1-dev-like; False:
    schnell-like, its scheduler too: unshifted, not dynamic)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8], guidance_embeds=guidance_embeds).eval()
    clip = CLIPTextModel(CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37,
        num_attention_heads=4, num_hidden_layers=2, vocab_size=64, projection_dim=32,
        max_position_embeddings=77)).eval()
    t5 = T5EncoderModel(T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=37, num_layers=2,
                                 num_heads=4, decoder_start_token_id=0, pad_token_id=0,
                                 eos_token_id=1)).eval()  # eval(): T5's dropout is on otherwise
    vae = tiny_vae(1, shift_factor=0.0609, scaling_factor=1.5035)
    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=dynamic_shift and guidance_embeds,
        shift=1.0 if dynamic_shift or not guidance_embeds else 3.0,
        base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.5, max_shift=1.15)
    FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=clip_tokenizer(),
                 text_encoder_2=t5, tokenizer_2=t5_tokenizer(),
                 transformer=transformer).save_pretrained(path)
    return str(path)


def make_tiny_sd3(path, dynamic_shift=False):
    """A tiny StableDiffusion3Pipeline saved in `path` (static shift 3 by default, as SD3.5)."""
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


def make_tiny_qwen_image(path, dynamic_shift=True):
    """A tiny QwenImagePipeline saved in `path`."""
    path = Path(path)
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler,
                           QwenImagePipeline, QwenImageTransformer2DModel)
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=16, guidance_embeds=False,
        axes_dims_rope=(8, 4, 4)).eval()
    vae = AutoencoderKLQwenImage(  # 4× downsampling; a mean and std that are not 0 and 1
        base_dim=24, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
        temperal_downsample=[False, True], latents_mean=[0.1, -0.2, 0.0, 0.3],
        latents_std=[1.5, 0.8, 1.0, 1.2]).eval()
    encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(  # mrope sums to head_dim / 2
        text_config=dict(hidden_size=16, intermediate_size=16, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, vocab_size=300,
                         bos_token_id=None, eos_token_id=256, pad_token_id=256,
                         rope_scaling={"mrope_section": [1, 1, 2], "rope_type": "default",
                                       "type": "default"}),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2,
                           out_hidden_size=16),
        hidden_size=16, vocab_size=300)).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=dynamic_shift, shift=1.0 if dynamic_shift else 3.0,
        base_shift=0.5, max_shift=0.9, base_image_seq_len=256, max_image_seq_len=8192)
    QwenImagePipeline(transformer=transformer, vae=vae, scheduler=scheduler,
                      text_encoder=encoder,
                      tokenizer=qwen_tokenizer(path / "tokenizer_files")).save_pretrained(path)
    return str(path)


def make_tiny_flux2_klein(path, dynamic_shift=True, distilled=False):
    """A tiny Flux2KleinPipeline saved in `path` (distilled: is_distilled, as the released 4B and
    9B)."""
    path = Path(path)
    from diffusers import (AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler,
                           Flux2KleinPipeline, Flux2Transformer2DModel)
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    transformer = Flux2Transformer2DModel(  # text: 3 encoder layers of 16 concatenated
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=48, timestep_guidance_channels=256,
        axes_dims_rope=[4, 4, 4, 4], guidance_embeds=False).eval()
    encoder = Qwen3ForCausalLM(Qwen3Config(  # 27 layers: the pipeline reads layers 9, 18, 27
        hidden_size=16, intermediate_size=16, num_hidden_layers=27, num_attention_heads=2,
        num_key_value_heads=2, head_dim=8, vocab_size=300, max_position_embeddings=512,
        bos_token_id=None, eos_token_id=256, pad_token_id=256)).eval()
    vae = AutoencoderKLFlux2(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=(4, 4, 4, 4),
        layers_per_block=1, latent_channels=1, norm_num_groups=1, sample_size=32,
        use_quant_conv=False, use_post_quant_conv=False).eval()
    with torch.no_grad():  # batch-norm statistics that are not the identity
        vae.bn.running_mean.copy_(torch.tensor([0.2, -0.1, 0.05, 0.3]))
        vae.bn.running_var.copy_(torch.tensor([1.5, 0.7, 1.2, 0.9]))
    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=dynamic_shift, shift=1.0 if dynamic_shift else 3.0)
    Flux2KleinPipeline(transformer=transformer, vae=vae, scheduler=scheduler,
                       text_encoder=encoder, tokenizer=chat_tokenizer(path / "tokenizer_files"),
                       is_distilled=distilled).save_pretrained(path)
    return str(path)


def make_tiny_z_image(path, dynamic_shift=False):
    """A tiny ZImagePipeline saved in `path`."""
    path = Path(path)
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(0)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=2,
        n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=16, axes_dims=[8, 4, 4],
        axes_lens=[256, 32, 32]).eval()
    with torch.no_grad():  # the pad tokens are not initialised by every diffusers release
        transformer.x_pad_token.normal_()
        transformer.cap_pad_token.normal_()
    encoder = Qwen3Model(Qwen3Config(
        hidden_size=16, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, head_dim=8, vocab_size=300, max_position_embeddings=512,
        bos_token_id=None, eos_token_id=256, pad_token_id=256)).eval()
    tokenizer = chat_tokenizer(path / "tokenizer_files")
    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=dynamic_shift, shift=1.0 if dynamic_shift else 3.0,
        base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    ZImagePipeline(transformer=transformer, scheduler=scheduler, text_encoder=encoder,
                   tokenizer=tokenizer,
                   vae=tiny_vae(4, shift_factor=0.1159,
                                scaling_factor=0.3611)).save_pretrained(path)
    return str(path)


# ----------------------------------------------------------------------------------------------
# Reward models.

# A tiny OpenCLIP architecture (HPS-v2.1's checkpoint format and OpenCLIP CLIP scores).
TINY_OPEN_CLIP = {"embed_dim": 16,
                  "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16,
                                 "patch_size": 8},
                  "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32,
                               "heads": 2, "layers": 2}}
# DFN5B-CLIP's preprocessing (open_clip's table of pretrained models: a squashing bicubic resize,
# OpenAI's mean and std), at the tiny model's size.
DFN_LIKE = {"size": 32, "mean": [0.48145466, 0.4578275, 0.40821073],
            "std": [0.26862954, 0.26130258, 0.27577711], "interpolation": "bicubic",
            "resize_mode": "squash"}


def make_tiny_clip(path):
    """A tiny CLIPModel with its tokenizer and image processor (16×16 images) saved in `path`:
    a --clip-model for the CLIP score."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(1)
    config = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4,
                         num_hidden_layers=2, vocab_size=64, max_position_embeddings=77,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4,
                           num_hidden_layers=2, image_size=16, patch_size=4),
        projection_dim=16)
    CLIPModel(config).eval().save_pretrained(path)
    clip_tokenizer().save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 16},
                       crop_size={"height": 16, "width": 16}).save_pretrained(path)
    return str(path)


def make_tiny_hps(folder, seed=0):
    """(checkpoint path, architecture config path): a tiny OpenCLIP in HPS's checkpoint format."""
    import open_clip

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arch = folder / "TinyHPS.json"
    arch.write_text(json.dumps(TINY_OPEN_CLIP))
    open_clip.add_model_config(str(arch))
    torch.manual_seed(seed)
    model = open_clip.create_model("TinyHPS")
    torch.save({"state_dict": model.state_dict()}, folder / "hps.pt")
    return str(folder / "hps.pt"), str(arch)


def make_tiny_open_clip(folder, seed=1):
    """A tiny OpenCLIP saved as OpenCLIP's Hub repos are: open_clip_config.json + safetensors."""
    import open_clip
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = open_clip.CLIP(**TINY_OPEN_CLIP)
    (folder / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": TINY_OPEN_CLIP, "preprocess_cfg": DFN_LIKE}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(folder / "open_clip_model.safetensors"))
    return str(folder)


# ----------------------------------------------------------------------------------------------
# A smoke test of an install.

# family → (its builder, a text length long enough that prompts differ after its template).
PIPELINES = {"flux": (make_tiny_flux, 16), "sd3": (make_tiny_sd3, 16),
             "qwen-image": (make_tiny_qwen_image, 512), "flux2-klein": (make_tiny_flux2_klein, 64),
             "z-image": (make_tiny_z_image, 64)}


def smoke_command(folder, family):
    """The image trainer's command line for a short run on the tiny `family` in `folder`."""
    folder = Path(folder)
    return ["--model", str(folder / family), "--clip-model", str(folder / "clip"),
            "--rewards", "clip", "--height", "32", "--width", "32", "--steps", "5",
            "--group-size", "3", "--branch-steps", "0,1", "--granularities", "1,2",
            "--max-sequence-length", str(PIPELINES[family][1]), "--iterations", "2",
            "--lora-rank", "4", "--eval-steps", "4", "--output-dir", str(folder / "runs" / family),
            "--overwrite"]


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m image_flow.tiny", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("family", choices=sorted(PIPELINES), help="the family to build")
    p.add_argument("folder", help="where the pipeline (<folder>/<family>), the CLIP reward "
                                  "(<folder>/clip) and the run (<folder>/runs/<family>) go")
    p.add_argument("--train", action="store_true",
                   help="then train on them: 2 iterations of the image trainer (LoRA, CPU)")
    args = p.parse_args(argv)
    folder = Path(args.folder)
    if folder.exists() and not folder.is_dir():
        p.error(f"{args.folder!r} is a file, not a folder")
    PIPELINES[args.family][0](folder / args.family)
    make_tiny_clip(folder / "clip")
    command = smoke_command(folder, args.family)
    print(f"wrote {folder / args.family} and {folder / 'clip'}; train on them with\n"
          f"  python -m image_flow {' '.join(command)}", flush=True)
    if args.train:
        from .trainer import main as train

        train(command)


if __name__ == "__main__":
    main()
