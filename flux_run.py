"""What an image_flow.py run writes, and how it survives: run directories, checkpoints, exported
weights, experiment tracking, evaluation grids, graceful stops. Long runs that lose nothing.

- RunDirectory: the output directory of one run. Checked writable before any model loads, locked
  (one run per directory), refuses to take over another run's files unless told to resume or
  overwrite, and keeps metrics.jsonl free of duplicated iterations after a kill and a resume.
- Checkpointer / load_checkpoint: trainable weights, optimizer state, the EMA weights (if any),
  every rank's RNG and the iteration in a torch.distributed.checkpoint directory: each rank writes and reads only its own
  shards (no process ever holds the whole model), written beside the previous checkpoint and
  renamed into place (never half-written), optionally in the background (async_save); resumable
  on another number of processes (DCP reshards); errors name the path and what is wrong.
- export_weights: the trained weights in the formats diffusers loads (a LoRA for
  the pipeline's load_lora_weights, or sharded safetensors for from_pretrained, gathered one tensor
  at a time).
- Tracker: --report-to tensorboard / wandb; captioned_grid: the evaluation image grids.
- GracefulStop: SIGTERM (a preempted cluster job) and the first Ctrl-C finish the current
  iteration, write a checkpoint and exit 0; a second Ctrl-C stops at once.
"""

import contextlib
import hashlib
import json
import os
import shutil
import signal
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

CHECKPOINT = "checkpoint"  # a directory: DCP shards, .metadata, g2rpo.json
LEGACY_CHECKPOINT = "checkpoint.pt"  # the single file of older versions (refused on resume)
META = "g2rpo.json"
METRICS = "metrics.jsonl"
EVAL = "eval.json"
RUN_FILES = (LEGACY_CHECKPOINT, METRICS, EVAL, "rank_checksums.json")
RUN_DIRS = (CHECKPOINT, CHECKPOINT + ".tmp", CHECKPOINT + ".old", "lora", "transformer",
            "tensorboard", "wandb")
LOCK = ".lock"


# ----------------------------------------------------------------------------------------------
# The output directory.


def _replace_file(path, write):
    """write(tmp) to a temporary file beside path, then rename it over path: the old file stays
    until the new one is whole, and a failed write leaves no temporary file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_text(path, text):
    _replace_file(path, lambda tmp: tmp.write_text(text))


def check_writable_dir(path, flag="--output-dir"):
    """Refuse a path that is a file, or whose nearest existing ancestor is not writable."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{flag} {str(path)!r} is a file, not a directory")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise NotADirectoryError(f"{flag} {str(path)!r}: {str(existing)!r} is a file, not a "
                                 f"directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"{flag} {str(path)!r}: {str(existing)!r} is not writable")


class RunDirectory:
    """One run's output directory (rank 0 only; other ranks pass is_main=False and do nothing).

    A directory that already holds a run (a checkpoint or metrics) is refused unless this run
    resumes (`resume`) or replaces it (`overwrite`: its files are deleted now). A lock held with
    flock (released by the kernel even after SIGKILL) keeps a second run out; close() clears it.
    """

    def __init__(self, path, resume=False, overwrite=False, is_main=True):
        self.path, self.is_main, self.lock = Path(path), is_main, None
        if not is_main:
            return
        check_writable_dir(self.path)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OSError(f"cannot create output directory {str(self.path)!r}: {e}") from e
        self._take_lock()
        held = [f for f in (CHECKPOINT, CHECKPOINT + ".old", LEGACY_CHECKPOINT, METRICS)
                if (self.path / f).exists()]
        if held and overwrite:
            for f in [*RUN_FILES, *(p.name for p in self.path.glob("eval_*.png"))]:
                (self.path / f).unlink(missing_ok=True)
            for d in RUN_DIRS:
                shutil.rmtree(self.path / d, ignore_errors=True)
        elif held and not resume:
            self.close()
            raise FileExistsError(
                f"output directory {str(self.path)!r} already holds a run ({', '.join(held)}); "
                f"continue it with --resume {self.path / CHECKPOINT}, replace it with "
                f"--overwrite, or choose another --output-dir")

    def _take_lock(self):
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock, the rest still holds
            return
        f = open(self.path / LOCK, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            owner = f.read().strip() or "unknown"
            f.close()
            raise RuntimeError(f"output directory {str(self.path)!r} is in use by another run "
                               f"(pid {owner}); one run at a time per directory") from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        self.lock = f

    def start(self, iteration):
        """Drop metrics rows from `iteration` on (and evaluations after it): a run killed after
        logging them but before the checkpoint that covers them logs them again after resuming."""
        metrics = self.path / METRICS
        if not self.is_main:
            return
        if metrics.exists():
            lines = metrics.read_text().splitlines()
            keep = [ln for ln in lines if ln.strip() and json.loads(ln)["iteration"] < iteration]
            if len(keep) != len(lines):
                _write_text(metrics, "".join(ln + "\n" for ln in keep))
        self._write_evals([e for e in self.evaluations() if e["iteration"] <= iteration])

    def evaluations(self):
        path = self.path / EVAL
        return json.loads(path.read_text())["evaluations"] if path.exists() else []

    def _write_evals(self, evals):
        if evals or (self.path / EVAL).exists():
            _write_text(self.path / EVAL, json.dumps({"evaluations": evals}, indent=1))

    def record_eval(self, iteration, scores, grid):
        """Add one evaluation (mean rewards after `iteration` iterations, by_domain's split, and
        its grid image) to eval.json, replacing an earlier one of the same iteration; returns the
        grid's path."""
        if not self.is_main:
            return None
        name = f"eval_{iteration:06d}.png"
        grid.save(self.path / name)
        evals = [e for e in self.evaluations() if e["iteration"] != iteration]
        evals.append({"iteration": iteration, **scores, "grid": name})
        self._write_evals(sorted(evals, key=lambda e: e["iteration"]))
        return self.path / name

    def log_metrics(self, metrics):
        if self.is_main:
            with open(self.path / METRICS, "a") as f:
                f.write(json.dumps(metrics) + "\n")

    def close(self):
        if self.lock is not None:
            (self.path / LOCK).unlink(missing_ok=True)
            self.lock.close()  # releases the flock
            self.lock = None


# ----------------------------------------------------------------------------------------------
# Evaluation scores: in-domain (trained on) and out-of-domain rewards.


DOMAINS = ("in_domain", "out_of_domain")


def by_domain(scores, trained):
    """{reward: mean} → {"in_domain": the rewards trained on, "out_of_domain": the others}, as
    the paper's Table 1 reports them."""
    return {"in_domain": {n: v for n, v in scores.items() if n in trained},
            "out_of_domain": {n: v for n, v in scores.items() if n not in trained}}


def domain_text(scores):
    """'in-domain clip 0.2512 | out-of-domain hps 0.2301' (a side left out when empty)."""
    return " | ".join(d.replace("_", "-") + " " + "  ".join(f"{n} {v:.4f}" for n, v in s.items())
                      for d, s in scores.items() if s)


# ----------------------------------------------------------------------------------------------
# Across ranks.


SAME_ON_EVERY_RANK = ("iteration", "window")  # by construction: not averaged


def all_reduce_metrics(metrics, world_size):
    """Average every number (and list of numbers) in a metrics dict over the ranks; integers
    whose average is a whole number (counts the same on every rank) stay integers."""
    if world_size == 1:
        return metrics
    keys = [k for k, v in metrics.items()
            if isinstance(v, (int, float, list)) and k not in SAME_ON_EVERY_RANK]
    flat = [torch.tensor(metrics[k], dtype=torch.float64).flatten() for k in keys]
    t = torch.cat(flat)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    t = (t / world_size).cpu()
    out, i = dict(metrics), 0
    for k, f in zip(keys, flat):
        v = t[i : i + len(f)].tolist()
        if isinstance(metrics[k], int) and v[0].is_integer():
            v = [int(v[0])]
        out[k] = v if isinstance(metrics[k], list) else v[0]
        i += len(f)
    return out


def check_ranks_in_sync(params, out, is_main):
    """Every rank must hold the same weights after training; record the checksums, fail loudly."""
    local = torch.stack([p.detach().double().sum() if not hasattr(p, "full_tensor")
                         else p.full_tensor().detach().double().sum() for p in params]).sum()
    sums = [None] * dist.get_world_size()
    dist.all_gather_object(sums, local.item())
    if is_main:
        (out / "rank_checksums.json").write_text(json.dumps(sums))
    if len(set(sums)) != 1:
        raise RuntimeError(f"trainable weights differ across ranks after training: {sums}")


# ----------------------------------------------------------------------------------------------
# Checkpoints: torch.distributed.checkpoint (DCP), each rank writing and reading its own shards.


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed; the message names the path and what is wrong."""


def _rank():
    return dist.get_rank() if dist.is_initialized() else 0


def _world():
    return dist.get_world_size() if dist.is_initialized() else 1


def _reduce_flag(flag, op):
    """A bool combined over the ranks with `op` (MIN: all, MAX: any); itself on one process."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return bool(flag)
    t = torch.tensor([1 if flag else 0])
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=op)
    return bool(t.item())


def _all_agree(ok):
    """True on every rank when `ok` holds on every rank (one all-reduce)."""
    return _reduce_flag(ok, dist.ReduceOp.MIN)


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
                 "rng": {f"rank{_rank()}": _rng_state(generator)}}
        if ema is not None:
            state["ema"] = ema.state_dict()  # DTensors of this rank's shards under FSDP2
        self._save(self.path, state, iteration, fp)

    def _save(self, final, state, iteration, fp, rescue_of=None):
        tmp = final.with_name(final.name + ".tmp")
        meta = {"format": "g2rpo-dcp-1", "iteration": iteration, "world_size": _world(),
                "fingerprint": fp}
        error = None
        if _rank() == 0:
            try:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
                (tmp / META).write_text(json.dumps(meta, indent=1))
            except OSError as e:
                error = e
        if _all_agree(error is None):
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
        if _rank() == 0:
            _replace_dir(tmp, final)
        if dist.is_initialized():
            dist.barrier()

    def _failed(self, final, tmp, error, state, iteration, fp, rescue_of):
        if _rank() == 0:
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
        if _all_agree(error is None):
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
            f"checkpoint {str(path)!r} is a single file, as flux_flow.py wrote before checkpoints "
            f"became torch.distributed.checkpoint directories (<output-dir>/{CHECKPOINT}/); it "
            f"cannot be resumed by this version: continue that run with the version that wrote "
            f"it, or start a new one")
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
    world = _world()
    rank, elastic = _rank(), meta["world_size"] != world
    state = train_state(model, optimizer)  # initialises AdamW's state so DCP can fill it
    # A weight that never had a gradient has no AdamW state in the checkpoint (Qwen-Image's last
    # block: its text stream's output is unused); it gets none here either.
    saved = metadata.state_dict_metadata
    stateless = [k for k in state["optimizer"]["state"] if f"optimizer.state.{k}.step" not in saved]
    for k in stateless:
        del state["optimizer"]["state"][k]
    if not elastic:
        state["rng"] = {f"rank{rank}": _rng_state(generator)}
        if f"rng.rank{rank}.generator" not in metadata.state_dict_metadata:
            raise CheckpointError(f"checkpoint {str(path)!r} lacks the RNG state of rank {rank}")
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
        if not _all_agree(g2rpo.all_finite(tensors)):
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
        s = derived_seed(seed, rank, start)
        generator.manual_seed(s)
        torch.manual_seed(s)
        if log is not None:
            log(f"elastic resume: checkpoint written by {meta['world_size']} process(es), this "
                f"run has {world}; weights and optimizer state continue exactly, sampling noise "
                f"does not (each rank's generators re-seeded from seed, rank and iteration)")
    else:
        rng = state["rng"][f"rank{rank}"]
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


def export_weights(out_dir, model, raw, lora_rank, dtype=torch.float32, max_shard_size=10**10,
                   pipeline=None):
    """Write what diffusers loads, replacing the previous export whole; all ranks call.

    LoRA: <out>/lora/pytorch_lora_weights.safetensors via the pipeline class's
    save_lora_weights (default FluxPipeline; with the adapter's config, so alpha survives), for
    pipe.load_lora_weights(<out>/lora).
    Full fine-tune: <out>/transformer/ (config + safetensors in `dtype`, split into shards of at
    most max_shard_size bytes with an index, as save_pretrained writes them) for the
    transformer class's from_pretrained(<out>/transformer). Under FSDP2 the weights are
    gathered one tensor at a time and rank 0 holds at most one shard. Returns the folder (rank 0).
    """
    is_main = _rank() == 0
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

                if pipeline is None:
                    from diffusers import FluxPipeline as pipeline
                pipeline.save_lora_weights(
                    tmp, transformer_lora_layers=get_peft_model_state_dict(raw),
                    transformer_lora_adapter_metadata=raw.peft_config["default"].to_dict())
        else:
            error = _export_transformer(tmp, model, raw, dtype, max_shard_size, is_main)
        if is_main and error is None:
            _replace_dir(tmp, final)
    except OSError as e:
        error = e
    if not _all_agree(error is None):
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


# ----------------------------------------------------------------------------------------------
# Experiment tracking and evaluation grids.

REPORT_TO = ("none", "tensorboard", "wandb")


def check_report_to(kind):
    """Fail before any model loads when the tracker's package is missing."""
    if kind not in REPORT_TO:
        raise ValueError(f"--report-to must be one of {', '.join(REPORT_TO)}, got {kind!r}")
    try:
        if kind == "tensorboard":
            import torch.utils.tensorboard  # noqa: F401  (needs the tensorboard package)
        elif kind == "wandb":
            import wandb  # noqa: F401
    except ImportError as e:
        raise ImportError(f"--report-to {kind} needs the {kind} package: pip install {kind} "
                          f"({e})") from None


class Tracker:
    """Scalars every iteration and evaluation grids, to TensorBoard (<out>/tensorboard) or
    Weights & Biases; does nothing for 'none' or on ranks other than 0.

    Scalar tags: train/<metric> for reward, reward_std, reward_anchor, loss, clip_frac, approx_kl,
    kl_ref (with --kl-beta), grad_norm, zero_std_frac, nfe, seconds; train/adv_abs_k/<k>; train/adv_abs_lambda/<λ>;
    eval/<reward>. Images: eval/grid.
    """

    SCALARS = ("reward", "reward_std", "reward_anchor", "loss", "clip_frac", "approx_kl",
               "kl_ref", "grad_norm", "zero_std_frac", "nfe", "seconds")

    def __init__(self, kind, out_dir, config, branch_steps, granularities, start=0, is_main=True):
        self.kind = kind if is_main else "none"
        self.ks, self.lams, self.writer = list(branch_steps), list(granularities), None
        if self.kind == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: events after the checkpoint we resume from are dropped, as in metrics
            self.writer = SummaryWriter(str(Path(out_dir) / "tensorboard"), purge_step=start)
        elif self.kind == "wandb":
            import wandb

            self.writer = wandb.init(project="g2rpo", dir=str(out_dir), config=config,
                                     resume="allow")

    def scalars(self, metrics):
        if self.writer is None:
            return
        values = {f"train/{k}": metrics[k] for k in self.SCALARS if k in metrics}
        ks = metrics.get("window", self.ks)  # MixGRPO trains the steps of its window
        values.update({f"train/adv_abs_k/{k}": a for k, a in zip(ks, metrics["adv_abs_k"])})
        values.update({f"train/adv_abs_lambda/{lam}": a
                       for lam, a in zip(self.lams, metrics.get("adv_abs_lambda", []))})
        self._log(values, metrics["iteration"] + 1)

    def evaluation(self, iteration, scores, grid):
        if self.writer is None:
            return
        self._log({f"eval/{d}/{n}": v for d in DOMAINS for n, v in scores[d].items()},
                  iteration)
        if self.kind == "tensorboard":
            import numpy as np

            self.writer.add_image("eval/grid", np.asarray(grid), iteration, dataformats="HWC")
        else:
            import wandb

            self.writer.log({"eval/grid": wandb.Image(grid)}, step=iteration)

    def _log(self, values, step):
        if self.kind == "tensorboard":
            for tag, v in values.items():
                self.writer.add_scalar(tag, v, step)
            self.writer.flush()
        else:
            self.writer.log(values, step=step)

    def close(self):
        if self.writer is not None:
            (self.writer.close if self.kind == "tensorboard" else self.writer.finish)()
            self.writer = None


def captioned_grid(images, prompts, seeds, title=""):
    """(rows = seeds, cols = prompts, 3, H, W) in [0, 1] → a PIL image with the prompt above each
    column, the seed beside each row and a title line (e.g. the iteration)."""
    import textwrap

    from PIL import Image, ImageDraw, ImageFont

    rows, cols, _, h, w = images.shape
    font = ImageFont.load_default()
    col_w = max(w, 160)
    chars = max(8, col_w // 7)
    captions = [textwrap.wrap(p, chars)[:3] for p in prompts]
    line_h, left = 12, 56
    top = line_h * (2 + max(len(c) for c in captions))
    canvas = Image.new("RGB", (left + cols * col_w, top + rows * h), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 2), title, fill="black", font=font)
    for j, lines in enumerate(captions):
        for i, line in enumerate(lines):
            draw.text((left + j * col_w + 2, line_h * (1 + i) + 2), line, fill="black", font=font)
    pixels = (images.permute(0, 1, 3, 4, 2).clamp(0, 1).numpy() * 255).round().astype("uint8")
    for r in range(rows):
        draw.text((4, top + r * h + h // 2 - 6), f"seed {seeds[r]}", fill="black", font=font)
        for j in range(cols):
            canvas.paste(Image.fromarray(pixels[r, j]),
                         (left + j * col_w + (col_w - w) // 2, top + r * h))
    return canvas


# ----------------------------------------------------------------------------------------------
# Stopping on a signal.


class GracefulStop:
    """SIGTERM and the first Ctrl-C set `requested`; a second Ctrl-C raises KeyboardInterrupt.

    Use as a context manager around training; `should_stop(world)` agrees across ranks, so every
    rank stops after the same iteration. Handlers are installed only in the main thread.
    """

    def __init__(self, log=print):
        self.requested, self.log, self.previous = None, log, {}

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.requested is not None:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        self.requested = signal.Signals(signum).name
        if self.log is not None:
            self.log(f"{self.requested} received: finishing this iteration, then a checkpoint and "
                     f"exit (Ctrl-C again to stop at once)")

    def should_stop(self, world_size):
        if world_size == 1:
            return self.requested is not None
        return _reduce_flag(self.requested is not None, dist.ReduceOp.MAX)

