"""What a flux_flow.py run writes, and how it survives: run directories, checkpoints, exported
weights, experiment tracking, evaluation grids, graceful stops. Long runs that lose nothing.

- RunDirectory: the output directory of one run. Checked writable before any model loads, locked
  (one run per directory), refuses to take over another run's files unless told to resume or
  overwrite, and keeps metrics.jsonl free of duplicated iterations after a kill and a resume.
- save_checkpoint / load_checkpoint: trainable weights, optimizer state, every rank's RNG and the
  iteration, written through a temporary file and a rename (never half-written); errors name the
  path and what is wrong; a checkpoint with non-finite weights or optimizer state is refused.
- export_weights: the trained weights in the formats diffusers loads (a LoRA for
  FluxPipeline.load_lora_weights, or a transformer folder for from_pretrained).
- Tracker: --report-to tensorboard / wandb; captioned_grid: the evaluation image grids.
- GracefulStop: SIGTERM (a preempted cluster job) and the first Ctrl-C finish the current
  iteration, write a checkpoint and exit 0; a second Ctrl-C stops at once.
"""

import json
import os
import shutil
import signal
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

import g2rpo

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
EVAL = "eval.json"
RUN_FILES = (CHECKPOINT, METRICS, EVAL, "rank_checksums.json")
RUN_DIRS = ("lora", "transformer", "tensorboard", "wandb")
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
        held = [f for f in (CHECKPOINT, METRICS) if (self.path / f).exists()]
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
        """Add one evaluation (mean rewards after `iteration` iterations, its grid image) to
        eval.json, replacing an earlier one of the same iteration; returns the grid's path."""
        if not self.is_main:
            return None
        name = f"eval_{iteration:06d}.png"
        grid.save(self.path / name)
        evals = [e for e in self.evaluations() if e["iteration"] != iteration]
        evals.append({"iteration": iteration, "scores": scores, "grid": name})
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
# Across ranks.


def all_reduce_metrics(metrics, world_size):
    """Average every number (and list of numbers) in a metrics dict over the ranks; the
    iteration, the same on every rank, stays an integer."""
    if world_size == 1:
        return metrics
    keys = [k for k, v in metrics.items()
            if isinstance(v, (int, float, list)) and k != "iteration"]
    flat = [torch.tensor(metrics[k], dtype=torch.float64).flatten() for k in keys]
    t = torch.cat(flat)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    t = (t / world_size).cpu()
    out, i = dict(metrics), 0
    for k, f in zip(keys, flat):
        v = t[i : i + len(f)].tolist()
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
# Checkpoints.


def _rng_state(generator):
    state = {"generator": generator.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def save_checkpoint(path, transformer, optimizer, generator, iteration, fp, world_size):
    """All ranks call; rank 0 writes path atomically. If that fails (disk full, read-only), the
    state goes to a rescue file in the temporary directory and the error names both paths."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    model_sd, optim_sd = get_state_dict(transformer, optimizer, options=opts)
    rng = [_rng_state(generator)]
    if world_size > 1:
        rng = [None] * world_size
        dist.all_gather_object(rng, _rng_state(generator))
    error = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        path = Path(path)
        ckpt = {"model": model_sd, "optimizer": optim_sd, "rng": rng, "iteration": iteration,
                "world_size": world_size, "fingerprint": fp}
        try:
            _replace_file(path, lambda tmp: torch.save(ckpt, tmp))
        except OSError as e:
            rescue = Path(tempfile.gettempdir()) / f"g2rpo-rescue-{os.getpid()}-{path.name}"
            try:
                _replace_file(rescue, lambda tmp: torch.save(ckpt, tmp))
                saved = f"this iteration's state was saved to {rescue} instead (--resume {rescue})"
            except OSError as e2:
                saved = f"a rescue copy in {rescue} failed too ({e2})"
            error = OSError(f"could not write checkpoint {str(path)!r}: {e.strerror or e}; {saved}")
    if dist.is_initialized():
        dist.barrier()
    if error is not None:
        raise error


def read_checkpoint(path):
    """Load and validate a checkpoint file; every error names the path and says what is wrong."""
    path = Path(path)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"checkpoint {str(path)!r} {what}")
    if path.stat().st_size == 0:
        raise ValueError(f"checkpoint {str(path)!r} is empty (0 bytes): an interrupted copy?")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types here; none of them names the file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"checkpoint {str(path)!r} is not a g2rpo checkpoint that torch.load "
                         f"can read ({first})") from None
    needed = ("model", "optimizer", "rng", "iteration", "world_size", "fingerprint")
    missing = [k for k in needed if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise ValueError(f"checkpoint {str(path)!r} is not a g2rpo checkpoint: it lacks "
                         f"{', '.join(missing)}")
    weights = list(ckpt["model"].values())
    state = [v for s in ckpt["optimizer"].get("state", {}).values() for v in s.values()
             if torch.is_tensor(v)]
    for what, tensors in (("weights", weights), ("optimizer state", state)):
        if not g2rpo.all_finite(tensors):
            raise ValueError(f"checkpoint {str(path)!r} holds non-finite {what}; refusing to "
                             f"resume from it")
    return ckpt


def load_checkpoint(path, transformer, optimizer, generator, fp, world_size, lr=None, log=print):
    """Restore what save_checkpoint wrote; refuse a checkpoint of another model or algorithm.

    lr: this run's learning rate; where it differs from the checkpoint's it is applied (logged).
    Returns the next iteration.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    ckpt = read_checkpoint(path)
    old = ckpt["fingerprint"]
    diff = sorted(k for k in set(fp) | set(old) if fp.get(k) != old.get(k))
    if diff:
        details = "; ".join(f"{k}: checkpoint {old.get(k)!r}, now {fp.get(k)!r}"
                            for k in diff if k != "transformer_config")
        raise ValueError(f"checkpoint {str(path)!r} was made for another model or config; it "
                         f"differs in: {', '.join(diff)}" + (f" ({details})" if details else ""))
    if ckpt["world_size"] != world_size:
        raise ValueError(f"checkpoint {str(path)!r} was written by {ckpt['world_size']} processes, "
                         f"this run has {world_size}: per-rank RNG states would not match")
    opts = StateDictOptions(full_state_dict=True, ignore_frozen_params=True, strict=False)
    set_state_dict(transformer, optimizer, model_state_dict=ckpt["model"],
                   optim_state_dict=ckpt["optimizer"], options=opts)
    old_lrs = {group["lr"] for group in optimizer.param_groups}
    if lr is not None and old_lrs != {lr}:
        if log is not None:
            log(f"learning rate: checkpoint {', '.join(f'{x:g}' for x in old_lrs)}, this run "
                f"{lr:g}: applying {lr:g}")
        for group in optimizer.param_groups:
            group["lr"] = lr
    rank = dist.get_rank() if dist.is_initialized() else 0
    rng = ckpt["rng"][rank]
    generator.set_state(rng["generator"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return ckpt["iteration"] + 1


# ----------------------------------------------------------------------------------------------
# Weights for the diffusers ecosystem.


def _replace_dir(tmp, final):
    """Swap a finished folder into place: the old one goes only after the new one is whole."""
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def export_weights(out_dir, model, raw, lora_rank):
    """Write what diffusers loads, replacing the previous export whole; all ranks call.

    LoRA: <out>/lora/pytorch_lora_weights.safetensors via FluxPipeline.save_lora_weights (with
    the adapter's config, so alpha survives), for pipe.load_lora_weights(<out>/lora).
    Full fine-tune: <out>/transformer/ (config + safetensors) for
    FluxTransformer2DModel.from_pretrained(<out>/transformer). Returns the folder (rank 0).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    is_main = not dist.is_initialized() or dist.get_rank() == 0
    name = "lora" if lora_rank > 0 else "transformer"
    if lora_rank == 0:  # FSDP2 shards the weights: gather them (a collective: every rank)
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                     cpu_offload=True))
    if not is_main:
        return None
    final = Path(out_dir) / name
    tmp = final.with_name(name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if lora_rank > 0:
            from diffusers import FluxPipeline
            from peft.utils import get_peft_model_state_dict

            FluxPipeline.save_lora_weights(
                tmp, transformer_lora_layers=get_peft_model_state_dict(raw),
                transformer_lora_adapter_metadata=raw.peft_config["default"].to_dict())
        else:
            from safetensors.torch import save_file

            tmp.mkdir(parents=True)
            raw.save_config(tmp)
            save_file({k: v.contiguous() for k, v in state.items()},
                      tmp / "diffusion_pytorch_model.safetensors")
        _replace_dir(tmp, final)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(f"could not export the trained weights to {str(final)!r}: "
                      f"{e.strerror or e}") from e
    return final


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
    grad_norm, zero_std_frac, nfe, seconds; train/adv_abs_k/<k>; train/adv_abs_lambda/<λ>;
    eval/<reward>. Images: eval/grid.
    """

    SCALARS = ("reward", "reward_std", "reward_anchor", "loss", "clip_frac", "approx_kl",
               "grad_norm", "zero_std_frac", "nfe", "seconds")

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
        values.update({f"train/adv_abs_k/{k}": a for k, a in zip(self.ks, metrics["adv_abs_k"])})
        values.update({f"train/adv_abs_lambda/{lam}": a
                       for lam, a in zip(self.lams, metrics.get("adv_abs_lambda", []))})
        self._log(values, metrics["iteration"] + 1)

    def evaluation(self, iteration, scores, grid):
        if self.writer is None:
            return
        self._log({f"eval/{k}": v for k, v in scores.items()}, iteration)
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
        flag = torch.tensor([1.0 if self.requested else 0.0])
        if world_size > 1:
            if dist.get_backend() == "nccl":
                flag = flag.cuda()
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

