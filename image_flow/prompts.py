"""Prompt embeddings: encoded once, through the family's encode (the pipeline's own
encode_prompt), one prompt at a time, and kept on disk.

A run encodes every prompt it will need before training (training and evaluation prompts, the
negative prompt; a progress bar, the work split across processes), then the text encoders are
freed: they never share the GPU with training. Each prompt's rows are one safetensors file
under --prompt-cache, named by a hash of everything that changes them (the text encoders' files,
the family, the text length, the dtype, the prompt), so a resumed run and the next run on the
same prompts read them back instead of encoding. A batch reads only its own prompts' files:
host memory does not grow with the number of prompts.
"""

import gc
import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch

from .families import family_of

CACHE_ENV = "G2RPO_PROMPT_CACHE"


def default_cache():
    """$G2RPO_PROMPT_CACHE, else ~/.cache/g2rpo/prompt-embeddings (XDG_CACHE_HOME honoured)."""
    if os.environ.get(CACHE_ENV):
        return os.environ[CACHE_ENV]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "g2rpo", "prompt-embeddings")


def text_encoder_identity(folder):
    """What identifies a checkpoint's text encoders and tokenizers without reading their
    weights: each file's name, size and modification time (a Hub snapshot's folder also names
    its commit)."""
    folder = Path(folder).resolve()
    files = sorted(f for d in folder.iterdir() if d.is_dir() and d.name.startswith(
        ("text_encoder", "tokenizer")) for f in d.rglob("*") if f.is_file())
    return [str(folder)] + [[str(f.relative_to(folder)), f.stat().st_size, f.stat().st_mtime_ns]
                            for f in files]


class MemoryStore(dict):
    """Rows by prompt in this process's memory (a library user's default; the trainer's is a
    DiskStore)."""


class DiskStore:
    """Rows by prompt, one safetensors file each, in `folder`; `identity` is everything besides
    the prompt that changes the rows. Files are written whole (a temporary file, then renamed),
    so a reader, another process or an interrupted run never sees half of one."""

    def __init__(self, folder, identity):
        self.folder = Path(folder)
        self.identity = json.dumps(identity, sort_keys=True, default=str)

    def path(self, prompt):
        key = hashlib.sha256(json.dumps([self.identity, prompt]).encode()).hexdigest()
        return self.folder / key[:2] / f"{key}.safetensors"

    def __contains__(self, prompt):
        return self.path(prompt).is_file()

    def __getitem__(self, prompt):
        from safetensors.torch import load_file

        tensors = load_file(self.path(prompt))
        return tuple(tensors[str(i)] for i in range(len(tensors)))

    def __setitem__(self, prompt, row):
        from safetensors.torch import save_file

        path = self.path(prompt)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        try:
            save_file({str(i): t.contiguous() for i, t in enumerate(row)}, tmp,
                      metadata={"prompt": prompt})
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


class PromptEncoder:
    """Prompts → the family's conditioning rows, each prompt encoded once under no_grad and
    kept in `store` (default: a MemoryStore) on the CPU.

    With a negative prompt (guidance that needs an unconditional row) it returns
    {"cond": rows, "uncond": the negative prompt's rows, repeated}; otherwise the rows.
    """

    def __init__(self, pipe, max_sequence_length=None, negative_prompt=None, store=None):
        self.pipe, self.family = pipe, family_of(pipe)
        self.store = MemoryStore() if store is None else store
        self.max_len = max_sequence_length or self.family.max_sequence_length
        self.negative_prompt = negative_prompt

    def needed(self, prompts):
        """The prompts these would ask for (the negative prompt too), each once."""
        extra = [] if self.negative_prompt is None else [self.negative_prompt]
        return list(dict.fromkeys([*prompts, *extra]))

    @torch.no_grad()
    def encode(self, prompt):
        """One prompt through the text encoders into the store. One at a time: its rows then do
        not depend on which prompts shared its batch (last bits of batched matmuls do), so a
        resumed run encodes what the first run did."""
        if not text_encoders(self.pipe):
            raise RuntimeError(f"prompt {prompt!r} was not encoded before training and the text "
                               f"encoders are released")
        (row,) = self.family.encode(self.pipe, [prompt], self.max_len)  # a fresh list: some
        self.store[prompt] = tuple(t.cpu() for t in row)  # pipelines rewrite the one given

    def rows(self, prompts):
        """list of P prompts → a tuple of (P, ...) tensors on the transformer's device."""
        for p in dict.fromkeys(prompts):
            if p not in self.store:
                self.encode(p)
        device = self.pipe.transformer.device
        return tuple(t.to(device) for t in self.family.collate([self.store[p] for p in prompts]))

    def __call__(self, prompts):
        prompts = list(prompts)
        if self.negative_prompt is None:
            return self.rows(prompts)
        # One collated batch, so that both halves share a text length (padded where they differ).
        both = self.rows(prompts + [self.negative_prompt] * len(prompts))
        return {"cond": tuple(t[: len(prompts)] for t in both),
                "uncond": tuple(t[len(prompts) :] for t in both)}


def encode_up_front(encoder, prompts, rank=0, world=1, progress=True):
    """Encode the prompts `encoder` will be asked for that its store lacks, the work split
    across processes (each writes its share; all wait for all). Returns how many were encoded
    here."""
    import torch.distributed as dist
    from tqdm.auto import tqdm

    needed = encoder.needed(prompts)
    # Shared by a split of the whole list (not of what each process finds missing, which
    # changes while the others write).
    if isinstance(encoder.store, DiskStore):
        needed = needed[rank::world]
    mine = [p for p in needed if p not in encoder.store]
    for p in tqdm(mine, desc="encoding prompts", disable=not progress or not mine,
                  dynamic_ncols=True):
        encoder.encode(p)
    if dist.is_initialized():
        dist.barrier()
    return len(mine)


def text_encoders(pipe):
    """{name: module} of the pipeline's text encoders still loaded."""
    return {n: m for n, m in pipe.components.items()
            if n.startswith("text_encoder") and m is not None}


def release_text_encoders(pipe):
    """Free the text encoders (GPU and host memory): every prompt is encoded by now."""
    pipe.register_modules(**{n: None for n in text_encoders(pipe)})
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
