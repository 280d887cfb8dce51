"""How fast can one batch of host requests reach the GPU?  Ways to upload 8 numpy rows.

    python3 bench/gpu/staging.py [--rows 8] [--shape 3,224,224] [--repeats 200]

A ResNet batch from numpy requests is 8 x 602 KB of pageable memory.  Each way below ends
with the rows in one device buffer, the copy complete; the median of ``--repeats`` runs:

* np.concatenate into a pinned buffer, then one H2D copy;
* torch.cat into the same pinned buffer (torch's default threads, then 1 and 16);
* the rows copied into the pinned buffer by a pool of threads, one row each;
* one cudaMemcpyAsync per row straight from pageable memory (the driver stages it).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_all import cuda, np  # noqa: E402  (puts the repo on sys.path)


def median_ms(body, repeats: int) -> float:
    for _ in range(5):
        body()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        body()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--shape", type=lambda v: tuple(int(d) for d in v.split(",")), default=(3, 224, 224))
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    import torch

    rows = [np.random.default_rng(i).standard_normal((1,) + args.shape).astype(np.float32) for i in range(args.rows)]
    nbytes = sum(r.nbytes for r in rows)
    out: dict[str, float] = {"batch_MB": nbytes / 1e6, "torch_threads_default": torch.get_num_threads()}
    with cuda.Stream() as stream, cuda.PinnedBuffer(nbytes) as pinned, cuda.DeviceBuffer(nbytes) as dev:
        flat = pinned.as_numpy(np.float32)
        packed = torch.from_numpy(flat.reshape((args.rows,) + args.shape))
        tensors = [torch.from_numpy(r) for r in rows]

        def upload_and_wait() -> None:
            cuda.copy_async(dev.ptr, pinned.ptr, nbytes, "htod", stream)
            stream.synchronize()

        def numpy_concat() -> None:
            np.concatenate([r.reshape(-1) for r in rows], out=flat)
            upload_and_wait()

        def torch_cat() -> None:
            torch.cat(tensors, out=packed)
            upload_and_wait()

        pool = ThreadPoolExecutor(args.rows)
        row_size = rows[0].size

        def copy_row(index: int) -> None:
            np.copyto(flat[index * row_size:(index + 1) * row_size], rows[index].reshape(-1))

        def thread_pool() -> None:
            list(pool.map(copy_row, range(args.rows)))
            upload_and_wait()

        def pageable_per_row() -> None:
            offset = 0
            for r in rows:
                cuda.copy_async(dev.ptr + offset, r.ctypes.data, r.nbytes, "htod", stream)
                offset += r.nbytes
            stream.synchronize()

        out["upload_only_ms"] = median_ms(upload_and_wait, args.repeats)
        out["numpy_concatenate_ms"] = median_ms(numpy_concat, args.repeats)
        out["torch_cat_default_threads_ms"] = median_ms(torch_cat, args.repeats)
        for threads in (1, 16):
            torch.set_num_threads(threads)
            out[f"torch_cat_{threads}_threads_ms"] = median_ms(torch_cat, args.repeats)
        torch.set_num_threads(int(out["torch_threads_default"]))
        out["thread_pool_row_copies_ms"] = median_ms(thread_pool, args.repeats)
        out["pageable_copy_per_row_ms"] = median_ms(pageable_per_row, args.repeats)
        pool.shutdown()
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
