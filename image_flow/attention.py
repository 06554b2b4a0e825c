"""Attention backends for the transformer: which kernels scaled_dot_product_attention may use.

cuDNN fused attention's bf16 backward gives NaN/inf gradients or illegal memory accesses on
Hopper GPUs (seen on an H200, torch 2.11.0+cu130; pytorch/pytorch#196678): transformers run
without it by default (--attention-backends).
"""

import contextlib

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

DEFAULT_ATTENTION = ("flash", "efficient", "math")
SDPA_BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                 "math": SDPBackend.MATH, "cudnn": SDPBackend.CUDNN_ATTENTION}


def sdpa_backends(spec):
    """'flash,efficient,math' → that tuple of names; 'all' → None (PyTorch's pick, cuDNN too)."""
    if spec is None or spec == "all":
        return None
    chosen = [n.strip() for n in spec.split(",") if n.strip()] if isinstance(spec, str) else spec
    if not chosen:
        raise ValueError("--attention-backends needs at least one of flash, efficient, math, "
                         "cudnn (or 'all')")
    for n in chosen:
        if n not in SDPA_BACKENDS:
            raise ValueError(f"unknown attention backend {n!r}; choose from "
                             f"{', '.join(SDPA_BACKENDS)} or 'all'")
    return tuple(dict.fromkeys(chosen))


def attention_context(backends):
    """A context in which scaled_dot_product_attention may use only `backends`, names already
    checked by sdpa_backends (None: any).

    torch restores the previous flags on exit, so nothing outside the context (VAE, rewards,
    other code in the process) sees the choice.
    """
    if backends is None:
        return contextlib.nullcontext()
    return sdpa_kernel([SDPA_BACKENDS[n] for n in backends])


def enabled_backends():
    """The backend names scaled_dot_product_attention may use right now (public torch flags)."""
    flags = {"flash": torch.backends.cuda.flash_sdp_enabled(),
             "efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
             "math": torch.backends.cuda.math_sdp_enabled(),
             "cudnn": torch.backends.cuda.cudnn_sdp_enabled()}
    return tuple(n for n, on in flags.items() if on)


def checkpoint_keeping_attention(module, *args):
    """diffusers' gradient_checkpointing_func: the recomputation in backward() runs outside
    Velocity's attention context, so it re-enters the backends the forward pass used."""
    backends = enabled_backends()

    def run(*a):
        with attention_context(backends):
            return module(*a)

    return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False)


