"""Benchmark: host memory of the prompt embeddings, held in memory or read from the disk cache.

    python -m benchmarks.prompt_cache                 # 100 and 10,000 prompts (~6 min on 2 cores)
    python -m benchmarks.prompt_cache --counts 10,100  # seconds

For each number of prompts, a fresh process loads a tiny FLUX.1 pipeline (image_flow/tiny.py;
text length 512, so each prompt's rows are 512 × 32 float32 values, 64 KB, as a real checkpoint's
are megabytes), encodes the prompts with the trainer's encode_up_front into the on-disk cache
(image_flow/prompts.py), frees the text encoders and reads every prompt back in batches of 8 as
training does. A second process holds the same rows in a dictionary in memory (a MemoryStore,
filled from the cache: the same tensors the text encoders give) and reads them the same way.
Each prints its peak resident set size above what it held once the pipeline was loaded and
one prompt encoded. With the disk cache the peak stays flat as prompts grow; in memory it grows
with them.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

TEXT_LENGTH = 512


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def prompt_list(n):
    return [f"prompt {i}: a red fox in the snow, picture {i * 7919 % 10007}" for i in range(n)]


def child(store_kind, n, folder, cache):
    """One measurement, in this process: {"store", "prompts", "peak_mb", "seconds", ...}."""
    import torch

    from image_flow import loading
    from image_flow.prompts import (DiskStore, MemoryStore, PromptEncoder, encode_up_front,
                                    release_text_encoders)

    torch.set_num_threads(1)
    pipe = loading.load_pipeline(folder)
    disk = DiskStore(cache, {"benchmark": folder, "max_sequence_length": TEXT_LENGTH})
    prompts = prompt_list(n)
    PromptEncoder(pipe, TEXT_LENGTH)(["warm-up"])  # allocations of a first encode
    base = peak_rss_mb()
    start = time.perf_counter()
    if store_kind == "disk":
        encoder = PromptEncoder(pipe, TEXT_LENGTH, store=disk)
        encoded = encode_up_front(encoder, prompts, progress=False)
    else:  # the rows the disk process encoded, held in this process's memory
        encoder, encoded = PromptEncoder(pipe, TEXT_LENGTH, store=MemoryStore()), 0
        for p in prompts:
            encoder.store[p] = disk[p]
    release_text_encoders(pipe)
    for i in range(0, n, 8):  # one pass over the prompts, as batches of training read them
        encoder(prompts[i : i + 8])
    row_bytes = sum(t.numel() * t.element_size() for t in disk[prompts[0]])
    return {"store": store_kind, "prompts": n, "encoded": encoded, "row_kb": row_bytes / 1024,
            "seconds": time.perf_counter() - start, "peak_mb": peak_rss_mb() - base}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.prompt_cache", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--counts", default="100,10000", help="comma-separated numbers of prompts")
    p.add_argument("--child", nargs=4, metavar=("STORE", "N", "FOLDER", "CACHE"),
                   help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        store, n, folder, cache = args.child
        print(json.dumps(child(store, int(n), folder, cache)))
        return None
    import torch

    from image_flow.tiny import make_tiny_flux

    counts = [int(c) for c in args.counts.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_tiny_flux(Path(tmp) / "flux")
        for n in counts:
            for store in ("disk", "memory"):  # the disk run encodes what the memory run holds
                cmd = [sys.executable, "-m", "benchmarks.prompt_cache", "--child", store, str(n),
                       folder, str(Path(tmp) / "cache")]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True,
                                     cwd=Path(__file__).resolve().parent.parent)
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"torch {torch.__version__}; tiny FLUX.1 pipeline, text length {TEXT_LENGTH}, "
          f"{rows[0]['row_kb']:.0f} KB of rows per prompt; peak RSS above the loaded pipeline")
    print(f"{'store':<8}{'prompts':>9}{'encoded':>9}{'seconds':>9}{'peak RSS MB':>13}")
    for r in rows:
        print(f"{r['store']:<8}{r['prompts']:>9}{r['encoded']:>9}{r['seconds']:>9.1f}"
              f"{r['peak_mb']:>13.1f}")
    return rows


if __name__ == "__main__":
    main()
