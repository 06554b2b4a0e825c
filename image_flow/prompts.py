"""Prompt embeddings: encoded once, through the family's encode (the pipeline's own
encode_prompt), one prompt at a time, and kept on disk.

A run encodes every prompt it will need before training (training and evaluation prompts, the
negative prompt; a progress bar, the work split across processes), then every process checks
every entry it will read, encodes what it lacks or finds damaged, and only then are the text
encoders freed: they never share the GPU with training, and nothing about the cache can fail
after they are gone.

The cache (--prompt-cache) holds one folder per checkpoint and settings, named by a hash of
everything that changes the rows: the text encoders' content (a Hub snapshot's commit, or
hashes of their configs, tokenizer files and weight files' ends), the family, the text length,
the dtype, the diffusers and transformers versions and the entry format. A moved or re-downloaded
checkpoint finds its folder again; a library upgrade starts a new one. Each prompt's rows are
one safetensors file there, written whole (fsync'd, then renamed) with its prompt, format and a
SHA-256 of its tensors in the metadata; a batch reads only its own prompts' files, so host memory
does not grow with the number of prompts.

    python -m image_flow.prompts                 # each folder: what it is for, size, last use
    python -m image_flow.prompts --prune 30      # delete the folders unused for 30 days
"""

import argparse
import gc
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from .families import family_of

CACHE_ENV = "G2RPO_PROMPT_CACHE"
FORMAT = 2  # an entry's layout (metadata, hash); another format is re-encoded
IDENTITY = "identity.json"  # in each folder: what its entries were encoded by (and last use)


def default_cache():
    """$G2RPO_PROMPT_CACHE, else ~/.cache/g2rpo/prompt-embeddings (XDG_CACHE_HOME honoured)."""
    if os.environ.get(CACHE_ENV):
        return os.environ[CACHE_ENV]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "g2rpo", "prompt-embeddings")


def text_encoder_identity(folder):
    """What identifies a checkpoint's text encoders and tokenizers by their content, wherever
    the checkpoint lies: a Hub snapshot's commit, else a SHA-256 of each config and tokenizer
    file and of each weight file's size, first and last MiB (a safetensors header names every
    tensor; the ends differ when the weights do), by path inside the checkpoint."""
    folder = Path(folder).resolve()
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        return {"hub_snapshot": folder.name}
    files = sorted(f for d in folder.iterdir() if d.is_dir() and d.name.startswith(
        ("text_encoder", "tokenizer")) for f in d.rglob("*") if f.is_file())
    return {str(f.relative_to(folder)): file_digest(f) for f in files}


def file_digest(path, ends=1 << 20):
    """SHA-256 of a file; of its size and first and last `ends` bytes for a weight file."""
    h, size = hashlib.sha256(), path.stat().st_size
    with open(path, "rb") as f:
        if path.suffix not in (".safetensors", ".bin", ".pt", ".pth") or size <= 2 * ends:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        else:
            h.update(str(size).encode() + f.read(ends))
            f.seek(size - ends)
            h.update(f.read(ends))
    return h.hexdigest()


def library_versions():
    """The versions of the libraries whose encode_prompt code makes the rows."""
    import diffusers
    import transformers

    return {"diffusers": diffusers.__version__, "transformers": transformers.__version__}


def tensors_digest(tensors):
    """SHA-256 of named tensors: each name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors, key=int):
        t = tensors[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class CacheError(OSError):
    """A cache entry that can neither be read nor replaced: a set-up error naming the file, the
    prompt and what to do."""


class MemoryStore(dict):
    """Rows by prompt in this process's memory (a library user's default; the trainer's is a
    DiskStore)."""


class DiskStore:
    """Rows by prompt, one safetensors file each, in a folder of `root` named by `identity`
    (everything besides the prompt that changes the rows). Entries are written whole (a
    temporary file, fsync'd, then renamed; the umask's mode), so a reader, another process or a
    crash never sees half of one, and read back only when they verify (read_checked)."""

    def __init__(self, root, identity, checkpoint=None):
        self.identity = {**identity, "format": FORMAT}
        text = json.dumps(self.identity, sort_keys=True, default=str)
        self.root, self.checkpoint = Path(root), checkpoint  # the latter: for the listing only
        self.folder = self.root / hashlib.sha256(text.encode()).hexdigest()[:20]

    def path(self, prompt):
        key = hashlib.sha256(prompt.encode()).hexdigest()
        return self.folder / key[:2] / f"{key}.safetensors"

    def __contains__(self, prompt):
        return self.path(prompt).exists()  # whatever it holds: problem() says

    def problem(self, prompt):
        """None when the entry for `prompt` is there and verifies, else what is wrong with it."""
        try:
            self.read_checked(prompt)
        except FileNotFoundError:
            return "missing"
        except CacheError as e:
            return e.reason
        return None

    def read_checked(self, prompt):
        """The rows of `prompt`, after checking its entry: readable, its prompt and format, its
        tensors' names, dtypes and shapes as recorded, and their hash. A CacheError says what
        is wrong (FileNotFoundError when there is no entry)."""
        from safetensors import safe_open

        path = self.path(prompt)
        if not path.exists():
            raise FileNotFoundError(path)
        try:
            with safe_open(str(path), "pt") as f:
                meta, tensors = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # truncated, empty, not safetensors, unreadable
            raise entry_error(path, prompt, f"cannot be read ({first_line(e)})") from None
        if meta.get("prompt") != prompt:
            raise entry_error(path, prompt, f"holds the prompt {meta.get('prompt')!r}")
        if meta.get("format") != str(FORMAT):
            raise entry_error(path, prompt, f"is in format {meta.get('format')}, not {FORMAT}")
        layout = json.loads(meta.get("layout", "[]"))
        if sorted(tensors, key=lambda k: int(k) if k.isdigit() else -1) != [
                str(i) for i in range(len(layout))]:
            raise entry_error(path, prompt, f"holds tensors {sorted(tensors)}, its layout "
                                            f"{len(layout)}")
        for i, (dtype, shape) in enumerate(layout):
            t = tensors[str(i)]
            if str(t.dtype) != dtype or list(t.shape) != shape:
                raise entry_error(path, prompt, f"holds tensor {i} as {t.dtype} "
                                                f"{list(t.shape)}, recorded as {dtype} {shape}")
        if tensors_digest(tensors) != meta.get("sha256"):
            raise entry_error(path, prompt, "does not match its SHA-256 (damaged data)")
        return tuple(tensors[str(i)] for i in range(len(layout)))

    def __getitem__(self, prompt):
        return self.read_checked(prompt)

    def __setitem__(self, prompt, row):
        from safetensors.torch import save_file

        path = self.path(prompt)
        path.parent.mkdir(parents=True, exist_ok=True)
        if not (self.folder / IDENTITY).is_file():
            self.record_identity()
        tensors = {str(i): t.contiguous() for i, t in enumerate(row)}
        meta = {"prompt": prompt, "format": str(FORMAT), "sha256": tensors_digest(tensors),
                "layout": json.dumps([[str(t.dtype), list(t.shape)] for t in row])}
        try:
            write_whole(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
        except OSError as e:
            raise CacheError(f"cannot write the prompt cache's entry {str(path)!r} for "
                             f"{prompt!r} ({e.strerror or e}): fix the folder's permissions or "
                             f"give another --prompt-cache") from None

    def remove(self, prompt, reason):
        """Delete a bad entry; a CacheError (naming the file, the prompt and the remedy) when it
        cannot be deleted."""
        path = self.path(prompt)
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as e:
            raise CacheError(f"the prompt cache's entry {str(path)!r} for {prompt!r} {reason} "
                             f"and cannot be replaced ({e.strerror or e}): delete it or fix its "
                             f"permissions, or give another --prompt-cache") from None

    def record_identity(self):
        """identity.json: what this folder's entries were encoded by; its time: the last use."""
        path = self.folder / IDENTITY
        if path.is_file():
            try:
                os.utime(path)
            except OSError:  # a cache this account may read but not write
                pass
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"checkpoint": self.checkpoint, **self.identity}, indent=1,
                          sort_keys=True, default=str)
        write_whole(path, lambda tmp: Path(tmp).write_text(text))


def entry_error(path, prompt, reason):
    e = CacheError(f"the prompt cache's entry {str(path)!r} for {prompt!r} {reason}")
    e.reason = reason
    return e


def first_line(e):
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def write_whole(path, write):
    """write(tmp) into a temporary file beside `path`, fsync'd, given the umask's mode, then
    renamed over `path` (and the folder fsync'd): `path` is the old file or the whole new one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would lock out other accounts
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
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


def encode_up_front(encoder, prompts, rank=0, world=1, progress=True, log=print):
    """Encode the prompts `encoder` will be asked for that its store lacks, the work split
    across processes (each writes its share; all wait for all). With a DiskStore, every process
    then checks every entry it will read and encodes here what it lacks (a cache folder that is
    not shared between nodes) or finds damaged (removed first, and said), so that nothing is
    missing or wrong once the text encoders are gone. Returns how many were encoded here."""
    import torch.distributed as dist
    from tqdm.auto import tqdm

    needed, store = encoder.needed(prompts), encoder.store
    disk = isinstance(store, DiskStore)
    # Shared by a split of the whole list (not of what each process finds missing, which
    # changes while the others write).
    mine = [p for p in (needed[rank::world] if disk else needed) if p not in store]
    if disk:
        check_free_space(encoder, mine, len(needed))
    for p in tqdm(mine, desc="encoding prompts", disable=not progress or not mine,
                  dynamic_ncols=True):
        if p not in store:  # check_free_space encoded the first
            encoder.encode(p)
    if not disk:
        return len(mine)
    if dist.is_initialized():
        dist.barrier()
    lacked, damaged = [], []
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:  # reading and hashing
        problems = list(tqdm(pool.map(store.problem, needed), total=len(needed),
                             desc="checking the prompt cache", disable=not progress,
                             dynamic_ncols=True))
    for p, problem in zip(needed, problems):
        if problem is None:
            continue
        if problem == "missing":
            lacked.append(p)
        else:
            damaged.append(p)
            log(f"rank {rank}: the prompt cache's entry {str(store.path(p))!r} for {p!r} "
                f"{problem}: removed and encoded again")
            store.remove(p, problem)
        encoder.encode(p)
        problem = store.problem(p)
        if problem is not None:  # written but not readable back: the folder itself is bad
            raise CacheError(f"the prompt cache's entry {str(store.path(p))!r} for {p!r} was "
                             f"written and {problem}: give another --prompt-cache")
    if rank == 0:
        store.record_identity()  # this run used the folder: --prune keeps it
    if lacked:
        log(f"rank {rank}: {len(lacked)} of the {len(needed)} prompts were not in this process's "
            f"view of {str(store.root)!r} (a folder not shared with the other processes?): "
            f"encoded here")
    if dist.is_initialized():
        dist.barrier()
    return len(mine) + len(lacked) + len(damaged)


def check_free_space(encoder, missing, total):
    """Refuse, before encoding, when the cache's disk lacks room for the missing entries
    (estimated from one encoded prompt), naming the figures."""
    if not missing:
        return
    encoder.encode(missing[0])
    each = encoder.store.path(missing[0]).stat().st_size
    need = each * (len(missing) - 1)
    free = shutil.disk_usage(encoder.store.folder).free
    if need > free:
        raise OSError(f"--prompt-cache {str(encoder.store.root)!r}: {len(missing)} of {total} "
                      f"prompts to encode need about {need / 1e9:.2f} GB more ({each / 1e6:.2f} "
                      f"MB each) and the disk has {free / 1e9:.2f} GB free; free some (python -m "
                      f"image_flow.prompts --prune DAYS) or give another --prompt-cache")


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


# ----------------------------------------------------------------------------------------------
# The cache's folders: listed, pruned.


def folders(root):
    """[(folder, identity dict, bytes, entries, last use as a time.time())] under `root`."""
    found = []
    for identity in sorted(Path(root).glob(f"*/{IDENTITY}")):
        entries = list(identity.parent.rglob("*.safetensors"))
        found.append((identity.parent, json.loads(identity.read_text()),
                      sum(e.stat().st_size for e in entries), len(entries),
                      identity.stat().st_mtime))
    return found


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m image_flow.prompts", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt-cache", default=None,
                   help=f"the cache (default: ${CACHE_ENV}, else ~/.cache/g2rpo/prompt-embeddings)")
    p.add_argument("--prune", type=float, default=None, metavar="DAYS",
                   help="delete the folders no run has used for DAYS days (0: all)")
    args = p.parse_args(argv)
    root = Path(args.prompt_cache or default_cache())
    if args.prune is not None and args.prune < 0:
        p.error(f"--prune must be >= 0 days, got {args.prune:g}")
    now, total, kept = time.time(), 0, 0
    print(f"{root}:")
    for folder, identity, size, entries, used in folders(root):
        days = (now - used) / 86400
        pruned = args.prune is not None and days >= args.prune
        if pruned:
            shutil.rmtree(folder)
        else:
            kept += size
        total += size
        what = (f"{identity.get('family')} {identity.get('checkpoint')}, text "
                f"{identity.get('max_sequence_length')} tokens, {identity.get('dtype')}")
        print(f"  {folder.name}  {size / 1e6:>10.1f} MB  {entries:>7} prompts  last used "
              f"{days:.1f} days ago  {what}{'  (pruned)' if pruned else ''}")
    print(f"total {total / 1e6:.1f} MB" + (f"; {kept / 1e6:.1f} MB kept" if args.prune is not None
                                          else ""))


if __name__ == "__main__":
    sys.exit(main())
