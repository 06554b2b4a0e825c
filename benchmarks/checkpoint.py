"""Host memory of a full fine-tune's checkpoint: each process's peak RSS while it saves and while
it resumes, FSDP2 on the CPU (gloo), for a random mid-size FLUX transformer (69 M parameters).

    python -m benchmarks.checkpoint                     # this checkout, 1 and 2 processes
    python -m benchmarks.checkpoint --code /tmp/before  # the same measurement of other code
    python -m benchmarks.checkpoint --async-save        # what dcp.async_save's staging costs
    python -m benchmarks.checkpoint --procs 1,2,4 --layers 2,6 --heads 10

--code DIR runs the image_flow package and g2rpo.py from DIR (another commit of this layout:
`mkdir /tmp/before && git archive <commit> | tar -x -C /tmp/before`). Each process: build the
transformer, shard it with parallel.wrap_distributed (FSDP2, fp32 master weights), take one AdamW
step, then

- save: reset the kernel's peak-RSS counter (/proc/self/clear_refs), save, read VmHWM;
- resume (a new torchrun job, as after a preemption): a fresh sharded model and optimizer, reset
  the counter, load, read VmHWM.

"base" is the RSS of the process before any model is built (torch, diffusers, process group);
"extra" is peak minus the RSS just before the operation: what the checkpoint itself costs.
"""

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def rss_mb(field="VmRSS"):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


def reset_peak():
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)


def measured(fn):
    """(seconds, RSS before in MB, peak RSS during in MB) of fn()."""
    import torch.distributed as dist

    gc.collect()
    dist.barrier()
    before = rss_mb()
    reset_peak()
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    peak = rss_mb("VmHWM")
    dist.barrier()
    return seconds, before, peak


def worker(args):
    sys.path.insert(0, str(Path(args.code).resolve()))
    import torch
    import torch.distributed as dist
    from diffusers import FluxTransformer2DModel

    from image_flow import checkpoints, parallel, trainer

    torch.set_num_threads(1)
    rank, world, device = parallel.init_distributed()
    base = rss_mb()
    layers, single = args.layers

    def build():
        torch.manual_seed(0)
        model = FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=layers, num_single_layers=single,
            attention_head_dim=64, num_attention_heads=args.heads, joint_attention_dim=512,
            pooled_projection_dim=256, axes_dims_rope=[16, 24, 24], guidance_embeds=True)
        trainer.setup_trainable(model, 0, 1.0, upcast=False)
        model = parallel.wrap_distributed(model, 0, device)
        params = [p for p in model.parameters() if p.requires_grad]
        return model, params, torch.optim.AdamW(params, lr=1e-5)

    model, params, opt = build()
    n = sum(p.numel() for p in params)
    generator = torch.Generator().manual_seed(rank)
    fp = {"bench": 1}
    path = Path(args.out) / "checkpoint"
    if args.phase == "save":
        for p in params:
            p.grad = torch.full_like(p, 1e-3)
        opt.step()
        opt.zero_grad(set_to_none=True)

        def op():
            checkpointer = checkpoints.Checkpointer(path, async_save=args.async_save)
            checkpointer.save(model, opt, generator, 0, fp)
            checkpointer.close()  # waits for an asynchronous save
    else:
        op = lambda: checkpoints.load_checkpoint(path, model, opt, generator, fp, 0, log=None)
    seconds, before, peak = measured(op)
    row = {"rank": rank, "params_M": n / 1e6, "base": base, "s": seconds, "before": before,
           "peak": peak}
    rows = [None] * world
    dist.all_gather_object(rows, row)
    if rank == 0:
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        print("ROWS " + json.dumps({"rows": rows, "bytes": size}))
    model = params = opt = op = None  # FSDP state goes before its process group does
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser(prog="python -m benchmarks.checkpoint", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--code", default=str(ROOT), help="folder holding image_flow/ and g2rpo.py")
    p.add_argument("--procs", default="1,2", help="comma-separated process counts")
    p.add_argument("--layers", default="2,6", help="double-stream,single-stream blocks")
    p.add_argument("--heads", type=int, default=10, help="attention heads of 64 channels")
    p.add_argument("--async-save", action="store_true", help="save with dcp.async_save")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--phase", choices=["save", "resume"], help=argparse.SUPPRESS)
    args = p.parse_args()
    args.layers = tuple(int(x) for x in args.layers.split(","))
    if args.worker:
        return worker(args)
    import torch

    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, code from {args.code}")
    print(f"{'procs':>5} {'rank':>4} {'params':>7} {'ckpt MB':>7} {'base':>5} | {'save: RSS':>9} "
          f"{'peak':>6} {'extra':>6} {'s':>4} | {'resume: RSS':>11} {'peak':>6} {'extra':>6} "
          f"{'s':>4}")
    for world in (int(x) for x in args.procs.split(",")):
        with tempfile.TemporaryDirectory() as out:
            result = {phase: run_phase(args, world, out, phase) for phase in ("save", "resume")}
        for s, r in zip(result["save"]["rows"], result["resume"]["rows"]):
            print(f"{world:>5} {s['rank']:>4} {s['params_M']:>6.1f}M "
                  f"{result['save']['bytes'] / 1e6:>7.0f} {s['base']:>5.0f} | {s['before']:>9.0f} "
                  f"{s['peak']:>6.0f} {s['peak'] - s['before']:>6.0f} {s['s']:>4.1f} | "
                  f"{r['before']:>11.0f} {r['peak']:>6.0f} {r['peak'] - r['before']:>6.0f} "
                  f"{r['s']:>4.1f}")
    print("MB of host memory (RSS); extra = peak during the operation - RSS just before it")


def run_phase(args, world, out, phase):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world),
           "--master_port", str(29700 + os.getpid() % 1000 + world), "-m",
           "benchmarks.checkpoint", "--worker", "--phase", phase, "--out", out, "--code",
           args.code, "--layers", f"{args.layers[0]},{args.layers[1]}", "--heads", str(args.heads),
           *(["--async-save"] if args.async_save else [])]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        sys.exit(f"{phase} on {world} process(es) failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return json.loads(next(line[5:] for line in r.stdout.splitlines() if line.startswith("ROWS ")))


if __name__ == "__main__":
    main()
