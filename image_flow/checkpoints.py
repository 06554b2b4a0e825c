"""Checkpoints and exported weights of an image run.

- Checkpointer / load_checkpoint: trainable weights, optimizer state, the EMA weights (if any),
  every rank's RNG and the iteration in a torch.distributed.checkpoint directory: each rank
  writes and reads only its own shards (no process ever holds the whole model), written beside
  the previous checkpoint and renamed into place (never half-written), optionally in the
  background (async_save); resumable on another number of processes (DCP reshards); errors name
  the path and what is wrong.
- export_weights: the trained weights in the formats diffusers loads (a LoRA for the pipeline's
  load_lora_weights, or sharded safetensors for from_pretrained, gathered one tensor at a time).
"""

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict,
                                                     set_state_dict)
from torch.distributed.tensor import DTensor

import g2rpo

from .parallel import all_agree, rank, world_size

CHECKPOINT = "checkpoint"  # a directory: DCP shards, .metadata, g2rpo.json
LEGACY_CHECKPOINT = "checkpoint.pt"  # the single file of older versions (refused on resume)
META = "g2rpo.json"


# ----------------------------------------------------------------------------------------------
# Checkpoints: torch.distributed.checkpoint (DCP), each rank writing and reading its own shards.


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed; the message names the path and what is wrong."""


def _rng_state(generator):
    state = {"generator": generator.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def derived_seed(seed, rank, iteration):
    """A 63-bit seed from (seed, rank, iteration): the generators of an elastic resume."""
    digest = hashlib.sha256(f"g2rpo:{seed}:{rank}:{iteration}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def train_state(model, optimizer):
    """{"model", "optimizer"}: the trainable weights and AdamW state, keyed by parameter name
    whatever the wrapper (none, DDP, FSDP2); under FSDP2 each rank holds DTensors of its shards
    only. No copy is made: DCP reads and writes these tensors in place."""
    opts = StateDictOptions(ignore_frozen_params=True)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=opts)
    # Buffers are not trained (SD3's fixed position table: 226 MB at SD3.5's size).
    buffers = {n.removeprefix("module.") for n, _ in model.named_buffers()}
    return {"model": {k: v for k, v in model_sd.items() if k not in buffers},
            "optimizer": optim_sd}


@contextlib.contextmanager
def _one_process_is_fine():
    """DCP warns whenever it runs without a process group; for one process that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _local(t):
    return t.to_local() if isinstance(t, DTensor) else t


def _reason(e):
    """The first line of what went wrong, digging into DCP's per-rank failures."""
    if isinstance(e, CheckpointException):
        e = next(iter(e.failures.values()))[0]
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    text = str(e).strip()
    return text.splitlines()[-1] if text else type(e).__name__


class _AlreadyStaged:
    """dcp.async_save's stager for a state dict that is a host copy already (DCP's AsyncStager
    protocol): hands it on as it is."""

    should_synchronize_after_execute = False

    def stage(self, state_dict, **kwargs):
        return state_dict

    def synchronize_staging(self):
        pass

    def close(self):
        pass


class Checkpointer:
    """Writes <output-dir>/checkpoint/: a DCP directory (.metadata and one __<rank>_0.distcp file
    per writing rank) holding the trainable weights, the optimizer state and each rank's RNG
    states, plus g2rpo.json (iteration, world size, fingerprint). All ranks call save().

    Atomic: the shards go to checkpoint.tmp/, which replaces checkpoint/ only once complete, so a
    save killed half-way leaves the previous checkpoint intact. A save that fails (disk full,
    read-only) goes to a rescue directory in the temporary directory and the error names both.
    async_save: this rank's shards are copied to host memory (DCP's DefaultStager) before save()
    returns, and dcp.async_save writes that copy while training goes on, its collectives on a
    process group of their own; the next save, or close(), waits for it and moves it into place.
    If the write fails, the rescue is written from the same copy: it holds the state of the
    iteration it is labelled with, whatever training did meanwhile.
    """

    def __init__(self, path, async_save=False, log=print):
        self.path, self.async_save, self.log, self.pending = Path(path), async_save, log, None
        self.group = None
        if async_save and dist.is_initialized():
            # The save's background collectives must not interleave with the training's (FSDP's
            # all-gathers, the metrics all-reduce) on the default group, where their order can
            # differ between ranks; gloo, because they run on the CPU copy.
            self.group = dist.new_group(backend="gloo")

    def save(self, model, optimizer, generator, iteration, fp, ema=None):
        """ema: a g2rpo.EMA whose averages are saved beside the weights (key "ema")."""
        self.wait(keep_going=True)
        state = {**train_state(model, optimizer),
                 "rng": {f"rank{rank()}": _rng_state(generator)}}
        if ema is not None:
            state["ema"] = ema.state_dict()  # DTensors of this rank's shards under FSDP2
        self._save(self.path, state, iteration, fp)

    def _save(self, final, state, iteration, fp, rescue_of=None):
        tmp = final.with_name(final.name + ".tmp")
        meta = {"format": "g2rpo-dcp-1", "iteration": iteration, "world_size": world_size(),
                "fingerprint": fp}
        error = None
        if rank() == 0:
            try:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
                (tmp / META).write_text(json.dumps(meta, indent=1))
            except OSError as e:
                error = e
        if all_agree(error is None):
            try:
                if self.async_save and rescue_of is None:
                    stager = DefaultStager(StagingOptions(use_pinned_memory=False,
                                                          use_shared_memory=False,
                                                          use_async_staging=False,
                                                          use_non_blocking_copy=False))
                    staged = stager.stage(state)  # a copy: the weights may change from now on
                    stager.close()
                    with _one_process_is_fine():
                        future = dcp.async_save(staged, checkpoint_id=tmp,
                                                process_group=self.group,
                                                async_stager=_AlreadyStaged(),
                                                no_dist=not dist.is_initialized())
                    self.pending = (future, tmp, final, staged, iteration, fp)
                    return
                with _one_process_is_fine():
                    dcp.save(state, checkpoint_id=tmp, process_group=self.group,
                             no_dist=not dist.is_initialized())
            except (CheckpointException, OSError) as e:
                error = e
        else:
            error = error or OSError("rank 0 could not create the checkpoint directory")
        if error is None:
            self._move_into_place(tmp, final)
        else:
            self._failed(final, tmp, error, state, iteration, fp, rescue_of)

    def _move_into_place(self, tmp, final):
        if dist.is_initialized():
            dist.barrier()  # every rank's shards are written
        if rank() == 0:
            _replace_dir(tmp, final)
        if dist.is_initialized():
            dist.barrier()

    def _failed(self, final, tmp, error, state, iteration, fp, rescue_of):
        if rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        if rescue_of is not None:  # the rescue failed as well
            raise OSError(f"could not write checkpoint {str(rescue_of)!r}; a rescue copy in "
                          f"{final} failed too ({_reason(error)})")
        key = hashlib.sha256(str(final.resolve()).encode()).hexdigest()[:8]
        rescue = Path(tempfile.gettempdir()) / f"g2rpo-rescue-{key}-{iteration:06d}"
        self._save(rescue, state, iteration, fp, rescue_of=final)
        raise OSError(f"could not write checkpoint {str(final)!r}: {_reason(error)}; this "
                      f"iteration's state was saved to {rescue} instead (--resume {rescue}); "
                      f"the previous checkpoint, if any, is intact")

    def wait(self, keep_going=False):
        """Finish the save in flight (async_save): wait for its shards, move it into place. If it
        failed, the state it was saving is written again, synchronously, with the rescue above;
        keep_going: only log the failure (the caller saves a newer state right after)."""
        if self.pending is None:
            return
        future, tmp, final, staged, iteration, fp = self.pending
        self.pending = None
        try:
            future.result()
            error = None
        except (CheckpointException, OSError) as e:
            error = e
        if all_agree(error is None):
            self._move_into_place(tmp, final)
            return
        if keep_going:
            if self.log is not None:
                self.log(f"asynchronous checkpoint of iteration {iteration} to {final} failed "
                         f"({_reason(error or OSError('on another rank'))}); saving the next "
                         f"state, and the rest of the run's, synchronously")
            self.async_save = False
            return
        self._failed(final, tmp, error or OSError("failed on another rank"), staged, iteration,
                     fp, None)

    close = wait


def find_checkpoint(path):
    """The checkpoint directory to read for --resume `path`: the path itself, or path.old when a
    save was killed between its two renames. Raises CheckpointError for what cannot be one."""
    path = Path(path)
    old = path.with_name(path.name + ".old")
    if not path.exists() and old.is_dir():
        return old
    if path.is_file():
        raise CheckpointError(
            f"checkpoint {str(path)!r} is a single file, as versions of this trainer wrote "
            f"before checkpoints became torch.distributed.checkpoint directories "
            f"(<output-dir>/{CHECKPOINT}/); it cannot be resumed by this version: continue that "
            f"run with the version that wrote it, or start a new one")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    if (path / CHECKPOINT).is_dir() and not (path / META).exists():
        raise CheckpointError(f"{str(path)!r} is a run directory, not a checkpoint: "
                              f"--resume {path / CHECKPOINT}")
    return path


def read_checkpoint(path):
    """(directory, g2rpo.json contents, DCP metadata) of a checkpoint, checked without reading a
    single shard: every error names the path and says what is wrong."""
    path = find_checkpoint(path)
    if not (path / ".metadata").is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} lacks .metadata: not a finished "
                              f"torch.distributed.checkpoint save")
    if not (path / META).is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} lacks {META}: not a g2rpo checkpoint")
    try:
        meta = json.loads((path / META).read_text())
    except (ValueError, OSError) as e:
        raise CheckpointError(f"checkpoint {str(path)!r}: {META} cannot be read ({e})") from None
    missing = [k for k in ("iteration", "world_size", "fingerprint")
               if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise CheckpointError(f"checkpoint {str(path)!r}: {META} lacks {', '.join(missing)}")
    try:
        metadata = dcp.FileSystemReader(str(path)).read_metadata()
    except Exception as e:  # an unpickling error, a truncated file: none names the path
        raise CheckpointError(f"checkpoint {str(path)!r}: .metadata cannot be read "
                              f"({_reason(e)})") from None
    shards = sorted({s.relative_path for s in metadata.storage_data.values()})
    absent = [s for s in shards if not (path / s).is_file()]
    if absent:
        raise CheckpointError(f"checkpoint {str(path)!r} lacks shard file(s) "
                              f"{', '.join(absent)} (of {len(shards)})")
    return path, meta, metadata


def check_fingerprint(path, old, fp, ignore=()):
    """Refuse a checkpoint whose fingerprint `old` differs from this run's `fp` (keys in
    `ignore` aside), naming every setting that differs."""
    diff = sorted(k for k in set(fp) | set(old) if k not in ignore and fp.get(k) != old.get(k))
    if diff:
        details = "; ".join(f"{k}: checkpoint {old.get(k)!r}, now {fp.get(k)!r}"
                            for k in diff if k != "transformer_config")
        raise CheckpointError(f"checkpoint {str(path)!r} was made for another model or config; "
                              f"it differs in: {', '.join(diff)}"
                              + (f" ({details})" if details else ""))


def load_checkpoint(path, model, optimizer, generator, fp, seed, lr=None, log=print, ema=None):
    """Restore what Checkpointer.save wrote, each rank reading only the shards it owns; refuse a
    checkpoint of another model or algorithm. All ranks call. ema: a g2rpo.EMA to restore too
    (the fingerprint says whether the run had one).

    Same world size: exact (weights, optimizer state, every rank's RNG). Another world size
    (elastic resume): DCP reshards weights and optimizer state exactly; each rank's generators
    are re-seeded from (seed, rank, iteration), and one line says so.
    lr: this run's learning rate; where it differs from the checkpoint's it is applied (logged).
    Returns the next iteration.
    """
    path, meta, metadata = read_checkpoint(path)
    check_fingerprint(path, meta["fingerprint"], fp)
    world = world_size()
    me, elastic = rank(), meta["world_size"] != world
    state = train_state(model, optimizer)  # initialises AdamW's state so DCP can fill it
    # A weight that never had a gradient has no AdamW state in the checkpoint (Qwen-Image's last
    # block: its text stream's output is unused); it gets none here either.
    saved = metadata.state_dict_metadata
    stateless = [k for k in state["optimizer"]["state"] if f"optimizer.state.{k}.step" not in saved]
    for k in stateless:
        del state["optimizer"]["state"][k]
    if not elastic:
        state["rng"] = {f"rank{me}": _rng_state(generator)}
        if f"rng.rank{me}.generator" not in metadata.state_dict_metadata:
            raise CheckpointError(f"checkpoint {str(path)!r} lacks the RNG state of rank {me}")
    if ema is not None:
        state["ema"] = ema.state_dict()  # loaded in place, resharded like the weights
        if not any(k.startswith("ema.") for k in metadata.state_dict_metadata):
            raise CheckpointError(f"checkpoint {str(path)!r} holds no EMA weights")
    try:
        with _one_process_is_fine():
            dcp.load(state, checkpoint_id=str(path), no_dist=not dist.is_initialized())
    except (CheckpointException, RuntimeError, ValueError, OSError) as e:
        raise CheckpointError(f"checkpoint {str(path)!r} cannot be loaded ({_reason(e)})") from None
    weights = [_local(v) for v in state["model"].values()]
    moments = [_local(v) for s in state["optimizer"]["state"].values() for v in s.values()
               if torch.is_tensor(v)]
    averages = [_local(v) for v in state.get("ema", {}).values()]
    for what, tensors in (("weights", weights), ("optimizer state", moments),
                          ("EMA weights", averages)):
        if not all_agree(g2rpo.all_finite(tensors)):
            raise CheckpointError(f"checkpoint {str(path)!r} holds non-finite {what}; refusing "
                                  f"to resume from it")
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"],
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))
    if stateless:
        by_name = {n.removeprefix("module."): p for n, p in model.named_parameters()}
        for k in stateless:
            optimizer.state.pop(by_name[k], None)
    old_lrs = {group["lr"] for group in optimizer.param_groups}
    if lr is not None and old_lrs != {lr}:
        if log is not None:
            log(f"learning rate: checkpoint {', '.join(f'{x:g}' for x in old_lrs)}, this run "
                f"{lr:g}: applying {lr:g}")
        for group in optimizer.param_groups:
            group["lr"] = lr
    start = meta["iteration"] + 1
    if elastic:
        s = derived_seed(seed, me, start)
        generator.manual_seed(s)
        torch.manual_seed(s)
        if log is not None:
            log(f"elastic resume: checkpoint written by {meta['world_size']} process(es), this "
                f"run has {world}; weights and optimizer state continue exactly, sampling noise "
                f"does not (each rank's generators re-seeded from seed, rank and iteration)")
    else:
        rng = state["rng"][f"rank{me}"]
        generator.set_state(rng["generator"])
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return start


# ----------------------------------------------------------------------------------------------
# Weights for the diffusers ecosystem.


def _replace_dir(tmp, final):
    """Swap a finished folder into place: the old one goes only after the new one is whole (a
    kill between the two renames leaves final.old, which find_checkpoint reads)."""
    old = final.with_name(final.name + ".old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def parse_size(text):
    """'10GB' → 10**10, '500MiB' → 500·2**20, '123' → 123 bytes (save_pretrained's units)."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20,
             "GIB": 2**30}
    s = str(text).strip().upper()
    num = s.rstrip("BGIKM")
    try:
        value = float(num) * units[s[len(num):]]
    except (KeyError, ValueError):
        raise ValueError(f"expected a size such as 10GB, 500MB or 2GiB, got {text!r}") from None
    if not value >= 1:
        raise ValueError(f"a size must be at least 1 byte, got {text!r}")
    return int(value)


def _shard_plan(sizes, max_shard_size):
    """Consecutive groups of names whose sizes add up to at most max_shard_size (a tensor larger
    than that gets a shard of its own), as save_pretrained splits its checkpoints."""
    shards, current, total = [], [], 0
    for name, size in sizes.items():
        if current and total + size > max_shard_size:
            shards.append(current)
            current, total = [], 0
        current.append(name)
        total += size
    return shards + [current] if current else shards


def export_weights(out_dir, model, raw, lora_rank, pipeline, dtype=torch.float32,
                   max_shard_size=10**10):
    """Write what diffusers loads, replacing the previous export whole; all ranks call.

    LoRA: <out>/lora/pytorch_lora_weights.safetensors via the pipeline class's
    save_lora_weights (`pipeline`: the pipeline class; with the adapter's config, so alpha
    survives), for pipe.load_lora_weights(<out>/lora).
    Full fine-tune: <out>/transformer/ (config + safetensors in `dtype`, split into shards of at
    most max_shard_size bytes with an index, as save_pretrained writes them) for the
    transformer class's from_pretrained(<out>/transformer). Under FSDP2 the weights are
    gathered one tensor at a time and rank 0 holds at most one shard. Returns the folder (rank 0).
    """
    is_main = rank() == 0
    name = "lora" if lora_rank > 0 else "transformer"
    final = Path(out_dir) / name
    tmp = final.with_name(name + ".tmp")
    error = None
    try:
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        if lora_rank > 0:
            if is_main:
                from peft.utils import get_peft_model_state_dict

                pipeline.save_lora_weights(
                    tmp, transformer_lora_layers=get_peft_model_state_dict(raw),
                    transformer_lora_adapter_metadata=raw.peft_config["default"].to_dict())
        else:
            error = _export_transformer(tmp, model, raw, dtype, max_shard_size, is_main)
        if is_main and error is None:
            _replace_dir(tmp, final)
    except OSError as e:
        error = e
    if not all_agree(error is None):
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(f"could not export the trained weights to {str(final)!r}: "
                      f"{_reason(error) if error else 'failed on rank 0'}")
    return final if is_main else None


def _export_transformer(tmp, model, raw, dtype, max_shard_size, is_main):
    """Shards of the full transformer in `dtype`; a collective (FSDP2 gathers tensor by tensor).
    Returns the OSError rank 0 met while writing (it keeps gathering, so no rank is left
    waiting), or None."""
    from safetensors.torch import save_file

    state = model.state_dict()  # DTensors of this rank's shards under FSDP2: no copy yet
    item = torch.tensor([], dtype=dtype).element_size()
    sizes = {k: v.numel() * item for k, v in state.items()}
    shards = _shard_plan(sizes, max_shard_size)
    files = (["diffusion_pytorch_model.safetensors"] if len(shards) == 1 else
             [f"diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
              for i in range(len(shards))])
    error = None
    if is_main:
        try:
            tmp.mkdir(parents=True)
            raw.save_config(tmp)
        except OSError as e:
            error = e
    for names, file in zip(shards, files):
        shard = {}
        for k in names:
            v = state[k]
            full = v.full_tensor() if isinstance(v, DTensor) else v  # one tensor gathered
            if is_main:
                shard[k] = full.detach().to(device="cpu", dtype=dtype).contiguous()
            del full
        if is_main and error is None:
            try:
                save_file(shard, tmp / file, metadata={"format": "pt"})
            except OSError as e:
                error = e
        del shard
    if is_main and error is None and len(shards) > 1:
        index = {"metadata": {"total_size": sum(sizes.values())},
                 "weight_map": {k: f for names, f in zip(shards, files) for k in names}}
        try:
            (tmp / "diffusion_pytorch_model.safetensors.index.json").write_text(
                json.dumps(index, indent=2, sort_keys=True))
        except OSError as e:
            error = e
    return error
