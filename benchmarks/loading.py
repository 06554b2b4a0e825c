"""Host memory while the pipeline loads: each process's peak RSS during
image_flow.loading.load_pipeline, beside the size of what it loads, for a FLUX.1 pipeline saved to
disk with a random mid-size transformer (69 M parameters, 276 MB in float32) and tiny text
encoders and VAE.

    python -m benchmarks.loading                        # 1 and 2 processes, onto the CPU
    python -m benchmarks.loading --device cuda          # onto each process's GPU
    python -m benchmarks.loading --code /tmp/before     # the same measurement of other code

Each process (torchrun, one per GPU with --device cuda) imports every class the pipeline names
(about 310 MB of RSS for torch, diffusers and transformers: code, not weights), resets the
kernel's peak-RSS counter, loads the pipeline onto its device, and reads VmHWM. "extra" is the
peak minus the RSS before loading: what loading costs the host. Onto the CPU the weights stay
memory-mapped from their safetensors files until they are first used, so "extra" is small
there. Onto a GPU it is what passes through host memory on the way: with every component read
straight onto the device it stays a fraction of "loaded" per process.
"""

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build(path, layers=(2, 6), heads=10):
    """The benchmark's pipeline in `path`: image_flow.tiny's FLUX.1 with a mid-size transformer."""
    import torch
    from diffusers import FluxTransformer2DModel

    from image_flow.tiny import make_tiny_flux

    make_tiny_flux(path)
    torch.manual_seed(0)
    FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=layers[0], num_single_layers=layers[1],
        attention_head_dim=64, num_attention_heads=heads, joint_attention_dim=32,
        pooled_projection_dim=32, axes_dims_rope=[16, 24, 24],
        guidance_embeds=True).save_pretrained(Path(path) / "transformer")


def worker(args):
    sys.path.insert(0, str(Path(args.code).resolve()))
    import torch
    import torch.distributed as dist

    from benchmarks.checkpoint import rss_mb, reset_peak
    from image_flow import loading, parallel

    torch.set_num_threads(1)
    rank, world, device = parallel.init_distributed()
    # Every class the pipeline names, imported before the measurement: code is not weights.
    import diffusers

    loading.model_classes(args.path)
    getattr(diffusers, loading.check_pipeline_class(args.path).pipeline)
    if args.device == "cpu":
        device = torch.device("cpu")
    gc.collect()
    dist.barrier()
    before = rss_mb()
    reset_peak()
    pipe = loading.load_pipeline(args.path, device, torch.float32)
    peak = rss_mb("VmHWM")
    loaded = sum(t.numel() * t.element_size() for m in pipe.components.values()
                 if isinstance(m, torch.nn.Module)
                 for t in [*m.parameters(), *m.buffers()]) / 1e6
    rows = [None] * world
    dist.all_gather_object(rows, {"rank": rank, "before": before, "peak": peak,
                                  "loaded": loaded, "device": str(device)})
    if rank == 0:
        print("ROWS " + json.dumps(rows))
    dist.barrier()
    dist.destroy_process_group()


def run(args, world, path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world),
           "--master_port", str(29800 + os.getpid() % 1000 + world), "-m", "benchmarks.loading",
           "--worker", "--path", path, "--code", args.code, "--device", args.device]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        sys.exit(f"{world} process(es) failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return json.loads(next(line[5:] for line in r.stdout.splitlines()
                           if line.startswith("ROWS ")))


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.loading", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--code", default=str(ROOT), help="folder holding image_flow/ and g2rpo.py")
    p.add_argument("--procs", default="1,2", help="comma-separated process counts")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="where each process loads the pipeline (cuda: its own GPU)")
    p.add_argument("--layers", default="2,6", help="double-stream,single-stream blocks")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--path", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    import torch

    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, onto {args.device}, code from "
          f"{args.code}")
    print(f"{'procs':>5} {'rank':>4} {'loaded MB':>9} | {'RSS before':>10} {'peak':>6} "
          f"{'extra':>6} {'extra/loaded':>12}")
    with tempfile.TemporaryDirectory() as folder:
        build(folder, tuple(int(x) for x in args.layers.split(",")))
        for world in (int(x) for x in args.procs.split(",")):
            for r in run(args, world, folder):
                extra = r["peak"] - r["before"]
                print(f"{world:>5} {r['rank']:>4} {r['loaded']:>9.0f} | {r['before']:>10.0f} "
                      f"{r['peak']:>6.0f} {extra:>6.0f} {extra / r['loaded']:>12.2f}")
    print("MB of host memory (RSS); extra = peak while loading - RSS just before it")


if __name__ == "__main__":
    main()
