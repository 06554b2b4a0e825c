"""The diffusers model families the image trainer knows, one module each; the seam they answer
is families/seam.py.

    flux1        FLUX.1 (FluxPipeline)
    sd3          Stable Diffusion 3 / 3.5 (StableDiffusion3Pipeline)
    qwen_image   Qwen-Image (QwenImagePipeline)
    flux2_klein  FLUX.2 [klein] (Flux2KleinPipeline)
    z_image      Z-Image (ZImagePipeline)

A new family is a new module here with a FAMILY (a seam.Family) and a line in FAMILIES; the
trainer's flags and checks are built from these, so no trainer code changes.
"""

import importlib

# model_index.json's _class_name → the module (in this package) whose FAMILY handles it.
FAMILIES = {"FluxPipeline": "flux1", "StableDiffusion3Pipeline": "sd3",
            "QwenImagePipeline": "qwen_image", "Flux2KleinPipeline": "flux2_klein",
            "ZImagePipeline": "z_image"}


def family_for(pipeline_class):
    """The Family for a pipeline class name (a ValueError names the supported ones)."""
    if pipeline_class not in FAMILIES:
        raise ValueError(f"a {pipeline_class} checkpoint; the image trainer trains {supported()}")
    return importlib.import_module(f"{__name__}.{FAMILIES[pipeline_class]}").FAMILY


def family_of(pipe):
    """The Family of a loaded pipeline."""
    return family_for(type(pipe).__name__)


def all_families():
    """Every Family, in FAMILIES' order."""
    return [family_for(c) for c in FAMILIES]


def supported():
    """'FluxPipeline (FLUX.1), StableDiffusion3Pipeline (SD3)': for error messages and --help."""
    return ", ".join(f"{c} ({family_for(c).name})" for c in FAMILIES)


def weightless_pipeline(pipeline_class, **models):
    """The pipeline class built around `models` (e.g. a transformer and VAE on the meta device),
    every other component None: what a family's questions about sizes and ids can be asked of
    before any weights load."""
    import diffusers

    cls = getattr(diffusers, pipeline_class)
    components = {k: None for k in cls._get_signature_keys(cls)[0]}
    return cls(**{**components, "scheduler": diffusers.FlowMatchEulerDiscreteScheduler(),
                  **models})
