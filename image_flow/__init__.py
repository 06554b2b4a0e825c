"""G²RPO on the diffusers flow-matching image models: one trainer for every family.

    # one GPU, LoRA (the family comes from the checkpoint's model_index.json)
    python -m image_flow --model black-forest-labs/FLUX.1-dev --lora-rank 64 --rewards clip
    python -m image_flow --model stabilityai/stable-diffusion-3.5-medium --lora-rank 64
    # the official recipe: full fine-tune, FSDP2, one prompt per GPU
    torchrun --nproc_per_node 8 -m image_flow --model /path/FLUX.1-dev --lora-rank 0 --height 720
    # evaluation only: ODE samples for the held-out prompts, mean rewards, an image grid
    python -m image_flow --model ... --eval --iterations 0
    # what each process will hold, from the configs alone (no weights load)
    python -m image_flow --model Qwen/Qwen-Image --plan
    # a smoke test on a laptop: a tiny random pipeline of any family, then a short run on it
    python -m image_flow.tiny sd3 /tmp/tiny && python -m image_flow --model /tmp/tiny/sd3 ...

The package, a module per concern:

    trainer.py      the run: η = 0 sampler, rewards, trainable weights, evaluation, the
                    callback, g2rpo.train
    prompts.py      prompt embeddings: encoded before training, kept on disk, encoders freed
    plan.py         memory per process from the configs on the meta device (--plan)
    flags.py        the command line, built from g2rpo.Config and the families; its checks;
                    the recipe (base or step-distilled) a checkpoint gets
    loading.py      the checkpoint read before any weights load, the pipeline, prompt files
    families/       the seam (seam.py) and one module per family: FLUX.1, SD3 / SD3.5,
                    Qwen-Image, FLUX.2 [klein], Z-Image
    velocity.py     g2rpo's velocity_fn for any family (both guidance rows in one call)
    attention.py    the attention backends the transformer may use (no cuDNN on Hopper)
    rewards.py      HPS-v2.1, CLIP score (DFN5B or a transformers CLIP), PickScore
    parallel.py     torchrun, DDP for a LoRA, FSDP2 for a full fine-tune, the KL's reference
    checkpoints.py  sharded atomic checkpoints (torch.distributed.checkpoint), exports
    runs.py         run directories, tracking, evaluation grids, stopping on a signal
    tiny.py         tiny random pipelines of every family and tiny reward models (tests,
                    benchmarks, smoke tests)

g2rpo.py stays model-agnostic; nothing here is imported at `import image_flow`.
"""
