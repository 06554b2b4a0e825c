"""What an image run writes beside its checkpoints (checkpoints.py), and how it stops.

- RunDirectory: the output directory of one run. Checked writable before any model loads, locked
  (one run per directory), refuses to take over another run's files unless told to resume or
  overwrite, and keeps metrics.jsonl free of duplicated iterations after a kill and a resume.
- by_domain / domain_text: evaluation scores split into in-domain and out-of-domain rewards.
- Tracker: --report-to tensorboard / wandb; captioned_grid: the evaluation image grids.
- GracefulStop: SIGTERM (a preempted cluster job) and the first Ctrl-C finish the current
  iteration, write a checkpoint and exit 0; a second Ctrl-C stops at once.
"""

import json
import os
import shutil
import signal
from pathlib import Path

import torch.distributed as dist

from .checkpoints import CHECKPOINT, LEGACY_CHECKPOINT
from .parallel import reduce_flag

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
    kl_ref (with --kl-beta), grad_norm, zero_std_frac, adv_clipped, nfe, seconds;
    train/adv_abs_k/<k>;
    train/adv_abs_lambda/<λ>;
    eval/<reward>. Images: eval/grid.
    """

    SCALARS = ("reward", "reward_std", "reward_anchor", "loss", "clip_frac", "approx_kl",
               "kl_ref", "grad_norm", "zero_std_frac", "adv_clipped", "nfe", "seconds")

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
        return reduce_flag(self.requested is not None, dist.ReduceOp.MAX)
