"""One command on a GPU machine: the GPU test suite, then the GPU benchmarks, then a report.

    python3 bench/gpu/run_all.py --out OUTDIR [--skip-tests] [--seconds 2.0] [--only preprocess,resnet]

Writes OUTDIR/gpu-tests.txt (pytest output), OUTDIR/report.json (every number) and
OUTDIR/report.md (the tables, also printed last).  Benchmarks:

1. Copies: H2D from pinned vs pageable memory; D2D copy bandwidth (bytes read + written).
2. FusedPreprocessTensor's kernel: effective bandwidth (source read + output written once)
   against the measured D2D bandwidth; and per-image time at a typical 1080p -> 224 size.
3. Preprocessing images/s: the GPU ops on device-resident images vs OpenCV on the CPU,
   and the whole JPEG -> 224x224 RGB chain through trtserve.pipe on GPU vs CPU backends.
4. ResNet-18 (random weights) as SyncTensor[TorchScriptTensor], instance_num 2, max 8,
   launched eagerly and from CUDA graphs, against the raw traced model at batch 8 on its
   own stream (resnet.py says how).
5. The server: ResNet-18 and the JPEG chain through ``trtserve serve`` against in-process
   ``pipe()``, the echo server and the bare-socket echo, with the targets they are held to
   (resnet.bench_server).
6. Shared memory: ResNet-18 through the server with inputs in system shared memory and in
   device memory (CUDA IPC) against in-process ``pipe()`` (shm_rows.py).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "clients")]

import cv2  # noqa: E402
import numpy as np  # noqa: E402

import importlib.util  # noqa: E402

import trtserve  # noqa: E402
from trtserve import cuda  # noqa: E402
from trtserve.backends.gpu import kernels  # noqa: E402


def _load_support():
    # By path: an installed distribution that ships a top-level "tests" package would
    # shadow this repository's tests/ namespace package.
    spec = importlib.util.spec_from_file_location("trtserve_gpu_support", ROOT / "tests" / "gpu" / "support.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


support = _load_support()
sys.path.insert(0, str(Path(__file__).resolve().parent))
import resnet  # noqa: E402
import shm_rows  # noqa: E402
from closed_loop import closed_loop  # noqa: E402

GIB = 1 << 30


def median_ms(fn: Callable[[], float], repeats: int) -> float:
    return statistics.median(fn() for _ in range(repeats))


def event_time_ms(stream: cuda.Stream, body: Callable[[], None], inner: int) -> float:
    """Milliseconds per ``body()`` call, timed with events around ``inner`` calls."""
    start, end = cuda.Event(timing=True), cuda.Event(timing=True)
    start.record(stream)
    for _ in range(inner):
        body()
    end.record(stream)
    end.synchronize()
    ms = start.elapsed_ms(end) / inner
    start.close()
    end.close()
    return ms


# --------------------------------------------------------------------------- 1. copies


def bench_copies() -> dict[str, Any]:
    out: dict[str, Any] = {}
    nbytes = 256 << 20
    host = np.random.default_rng(0).integers(0, 256, nbytes, dtype=np.uint8)
    with cuda.Stream() as stream, cuda.PinnedBuffer(nbytes) as pinned, cuda.DeviceBuffer(nbytes) as dev:
        pinned.as_numpy()[:] = host
        done = cuda.Event()

        def timed(src_ptr: int) -> float:
            t0 = time.perf_counter()
            cuda.copy_async(dev.ptr, src_ptr, nbytes, "htod", stream)
            returned = time.perf_counter() - t0
            done.record(stream)
            done.synchronize()
            timed.returned.append(returned)
            return (time.perf_counter() - t0) * 1e3

        timed.returned = []
        for label, ptr in (("pageable", host.ctypes.data), ("pinned", pinned.ptr)):
            timed.returned.clear()
            timed(ptr)
            ms = median_ms(lambda ptr=ptr: timed(ptr), 5)
            out[f"h2d_{label}_GBps"] = nbytes / ms / 1e6
            out[f"h2d_{label}_call_returned_after_ms"] = statistics.median(timed.returned) * 1e3
        done.close()
    size = GIB
    with cuda.Stream() as stream, cuda.DeviceBuffer(size) as a, cuda.DeviceBuffer(size) as b:
        cuda.copy_async(b.ptr, a.ptr, size, "dtod", stream)
        ms = median_ms(lambda: event_time_ms(stream, lambda: cuda.copy_async(b.ptr, a.ptr, size, "dtod", stream), 5), 5)
        out["d2d_GBps_read_plus_write"] = 2 * size / ms / 1e6
    return out


# --------------------------------------------------------------------------- 2. fused kernel


def gpu_and_host_us(stream: cuda.Stream, body: Callable[[], None], calls: int, cover_ms: float = 30.0) -> dict[str, Any]:
    """Device time per call and host enqueue time per call.

    The calls are queued behind a spin kernel, so the GPU runs them back to back with no
    host gaps between them: the event interval is device time only.  ``covered`` says the
    host finished enqueueing before the spin ended (else the device time includes gaps).
    """
    start, end = cuda.Event(timing=True), cuda.Event(timing=True)
    support.kernel("spin").launch(1, 1, [support.spin_cycles(cover_ms)], stream)
    start.record(stream)
    t0 = time.perf_counter()
    for _ in range(calls):
        body()
    host_s = time.perf_counter() - t0
    end.record(stream)
    end.synchronize()
    device_ms = start.elapsed_ms(end)
    start.close()
    end.close()
    return {"device_us": device_ms * 1e3 / calls, "host_us": host_s * 1e6 / calls, "covered": host_s * 1e3 < cover_ms}


def bench_fused(d2d_gbps: float | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with cuda.Stream() as stream, cuda.use_stream(stream):
        for label, (sh, sw), (dh, dw), count in (
            ("4k_to_4k", (2160, 3840), (2160, 3840), 4),
            ("1080p_to_224", (1080, 1920), (224, 224), 8),
        ):
            sources = [cuda.to_device(support.photo(sh, sw, seed=i)) for i in range(count)]
            calls = iter(range(1 << 30))

            def body(sources=sources, calls=calls, count=count, dh=dh, dw=dw) -> None:
                src = sources[next(calls) % count]  # rotate: a 25 MB 4K source would sit in L2
                kernels.fused_preprocess(src, dh, dw, support.MEAN, support.STD, True, stream)

            gpu_and_host_us(stream, body, 5)  # compile, warm the pool
            runs = [gpu_and_host_us(stream, body, 40) for _ in range(5)]
            device_us = statistics.median(r["device_us"] for r in runs)
            moved = sh * sw * 3 + 3 * dh * dw * 4
            out[label] = {
                "device_us_per_image": device_us,
                "host_enqueue_us_per_image": statistics.median(r["host_us"] for r in runs),
                "effective_GBps": moved / device_us / 1e3,
                "bytes_per_image": moved,
                "covered": all(r["covered"] for r in runs),
            }
            if d2d_gbps:
                out[label]["fraction_of_d2d"] = out[label]["effective_GBps"] / d2d_gbps
    return out


# --------------------------------------------------------------------------- 3. preprocessing


def bench_preprocess(seconds: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    frames = [support.photo(1080, 1920, seed=i) for i in range(8)]
    # GPU ops on device-resident 1080p BGR frames -> 224x224 RGB
    with cuda.Stream() as stream, cuda.use_stream(stream):
        dev = [cuda.to_device(f) for f in frames]
        calls = iter(range(1 << 30))

        def unfused() -> None:
            kernels.swap_rb_u8(kernels.resize_u8(dev[next(calls) % 8], 224, 224))

        def fused() -> None:
            kernels.fused_preprocess(dev[next(calls) % 8], 224, 224, support.MEAN, support.STD, True)

        for label, body in (("gpu_resize_cvtcolor", unfused), ("gpu_fused", fused)):
            gpu_and_host_us(stream, body, 10)
            runs = [gpu_and_host_us(stream, body, 100, cover_ms=60.0) for _ in range(3)]
            out[f"{label}_device_images_per_s"] = 1e6 / statistics.median(r["device_us"] for r in runs)
            out[f"{label}_one_python_thread_images_per_s"] = 1e6 / statistics.median(r["host_us"] for r in runs)
            out[f"{label}_covered"] = all(r["covered"] for r in runs)
    # OpenCV on the CPU, same work
    def cv_ops(i: int) -> None:
        cv2.cvtColor(cv2.resize(frames[i % 8], (224, 224), interpolation=cv2.INTER_LINEAR), cv2.COLOR_BGR2RGB)

    out["cpu_opencv_resize_cvtcolor_1_thread_images_per_s"] = closed_loop(cv_ops, 1, seconds)["per_s"]
    out["cpu_opencv_resize_cvtcolor_16_threads_images_per_s"] = closed_loop(cv_ops, 16, seconds)["per_s"]
    # Whole chain from JPEG bytes through trtserve.pipe
    jpegs = [support.jpeg(f) for f in frames]
    chains = {
        "pipe_gpu_chain": {"backend": "SyncTensor[S[DecodeTensor,ResizeTensor,CvtColorTensor]]", "instance_num": 8,
                           "resize_h": 224, "resize_w": 224, "color": "rgb"},
        # The same chain decoding on the host (OpenCV) and uploading: what "auto" does without nvImageCodec.
        "pipe_gpu_chain_opencv_decode": {"backend": "SyncTensor[S[DecodeTensor,ResizeTensor,CvtColorTensor]]", "instance_num": 8,
                                         "resize_h": 224, "resize_w": 224, "color": "rgb", "decoder": "opencv"},
        "pipe_cpu_chain": {"backend": "S[DecodeMat,ResizeMat,CvtColorMat]", "instance_num": 8,
                           "resize_h": 224, "resize_w": 224, "color": "rgb"},
    }
    for label, config in chains.items():
        with trtserve.pipe(config) as pipe:
            run = lambda i: pipe({"data": jpegs[i % 8]})  # noqa: E731
            closed_loop(run, 16, 0.5)
            out[label] = closed_loop(run, 16, seconds)
    out["jpeg_source"] = "1920x1080 synthetic photo, JPEG quality 90"
    out["decoder_auto"] = _auto_decoder()
    out["cpu_cores"] = os.cpu_count()
    return out


def _auto_decoder() -> str:
    try:
        from nvidia import nvimgcodec  # noqa: F401
    except ImportError:
        return "opencv (nvImageCodec not installed)"
    return f"nvimgcodec {getattr(nvimgcodec, '__version__', '?')}"


# --------------------------------------------------------------------------- report


def environment() -> dict[str, Any]:
    env: dict[str, Any] = {"date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
    env["python"] = platform.python_version()
    info = cuda.device_info(0)
    env["gpu"] = f"{info.name} (cc {info.compute_capability[0]}.{info.compute_capability[1]}, {info.multiprocessors} SMs)"
    for name in ("torch", "torchvision", "cupy", "cv2", "numpy"):
        try:
            env[name] = __import__(name).__version__
        except Exception as exc:
            env[name] = f"not available ({type(exc).__name__})"
    try:
        from cuda import bindings

        env["cuda-bindings"] = bindings.__version__
    except Exception as exc:
        env["cuda-bindings"] = f"unknown ({exc})"
    try:
        env["nvidia-smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=30).stdout.strip()
    except Exception as exc:
        env["nvidia-smi"] = f"unavailable ({exc})"
    return env


def run_tests(out: Path) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "clients"), str(ROOT / "bench"), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "pytest", "tests/gpu", "tests/unit/test_cuda_logic.py", "-q", "-rs", "-s",
           "-p", "no:cacheprovider", f"--junitxml={out / 'gpu-tests.xml'}"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=330)
    text = proc.stdout + proc.stderr
    (out / "gpu-tests.txt").write_text(text)
    lines = [line for line in text.strip().splitlines() if line.strip()]
    summary = next((line for line in reversed(lines) if " passed" in line or " failed" in line or " error" in line),
                   lines[-1] if lines else "")
    notes = [line for line in lines if line.startswith(("fused:", "hwc:"))]
    return {"command": " ".join(cmd), "returncode": proc.returncode, "summary": summary.strip("= "), "seconds": time.perf_counter() - t0, "notes": notes}


def markdown(report: dict[str, Any]) -> str:
    env, lines = report["environment"], []
    lines += ["# trtserve GPU report", "", f"- date: {env['date_utc']}", f"- GPU: {env['gpu']}; nvidia-smi: {env.get('nvidia-smi')}",
              f"- torch {env['torch']}, torchvision {env['torchvision']}, cuda-bindings {env['cuda-bindings']}, cupy {env['cupy']}, OpenCV {env['cv2']}"]
    if "tests" in report:
        t = report["tests"]
        lines += ["", "## GPU tests", "", f"`{t['command']}`", "", f"**{t['summary']}** (exit {t['returncode']}, {t['seconds']:.0f} s)"]
        lines += [f"- {n}" for n in t["notes"]]
    c = report.get("copies", {})
    if "d2d_GBps_read_plus_write" in c:
        lines += ["", "## Copies (256 MiB H2D, 1 GiB D2D)", "", "| copy | GB/s | call returned after (ms) |", "|---|---|---|",
                  f"| H2D pageable | {c['h2d_pageable_GBps']:.1f} | {c['h2d_pageable_call_returned_after_ms']:.2f} |",
                  f"| H2D pinned | {c['h2d_pinned_GBps']:.1f} | {c['h2d_pinned_call_returned_after_ms']:.3f} |",
                  f"| D2D (read+write) | {c['d2d_GBps_read_plus_write']:.0f} | - |"]
    f = report.get("fused", {})
    if "4k_to_4k" in f:
        lines += ["", "## Fused preprocessing kernel (resize + BGR->RGB + normalise + CHW float32)", "",
                  "Device time with launches queued back to back (behind a spin kernel); host time is what one Python call costs to enqueue.", "",
                  "| case | device us/image | effective GB/s | of D2D | host enqueue us/call |", "|---|---|---|---|---|"]
        for k in ("4k_to_4k", "1080p_to_224"):
            r = f[k]
            lines.append(f"| {k} | {r['device_us_per_image']:.1f} | {r['effective_GBps']:.0f} | "
                         f"{100 * r.get('fraction_of_d2d', float('nan')):.0f}% | {r['host_enqueue_us_per_image']:.1f} |")
    p = report.get("preprocess", {})
    if "pipe_gpu_chain" in p:
        lines += ["", "## Preprocessing, 1080p -> 224x224 RGB (images/s)", "", "| what | images/s |", "|---|---|",
                  f"| GPU resize+cvtColor kernels, device time (device-resident frames) | {p['gpu_resize_cvtcolor_device_images_per_s']:.0f} |",
                  f"| GPU resize+cvtColor kernels, issued from one Python thread | {p['gpu_resize_cvtcolor_one_python_thread_images_per_s']:.0f} |",
                  f"| GPU fused kernel, device time | {p['gpu_fused_device_images_per_s']:.0f} |",
                  f"| GPU fused kernel, issued from one Python thread | {p['gpu_fused_one_python_thread_images_per_s']:.0f} |",
                  f"| OpenCV resize+cvtColor, 1 thread | {p['cpu_opencv_resize_cvtcolor_1_thread_images_per_s']:.0f} |",
                  f"| OpenCV resize+cvtColor, 16 threads | {p['cpu_opencv_resize_cvtcolor_16_threads_images_per_s']:.0f} |",
                  f"| pipe: JPEG -> SyncTensor[S[DecodeTensor,ResizeTensor,CvtColorTensor]] x8, 16 clients, decoder auto = {p.get('decoder_auto')} | {p['pipe_gpu_chain']['per_s']:.0f} |",
                  f"| pipe: the same chain, decoder = opencv (host decode + pinned upload) | {p['pipe_gpu_chain_opencv_decode']['per_s']:.0f} |",
                  f"| pipe: JPEG -> S[DecodeMat,ResizeMat,CvtColorMat] x8, 16 clients | {p['pipe_cpu_chain']['per_s']:.0f} |"]
    lines += resnet.markdown(report.get("resnet", {}))
    lines += resnet.server_markdown(report.get("server", {}))
    lines += shm_rows.markdown(report.get("shm", {}))
    for name, err in report.get("errors", {}).items():
        lines += ["", f"**{name} failed:** `{err.splitlines()[-1] if err else ''}`"]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--seconds", type=float, default=2.0, help="per throughput measurement")
    parser.add_argument("--only", default="", help="comma-separated benchmarks to run (copies, fused, preprocess, resnet, server, shm); default all")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if not cuda.is_available():
        print(f"no CUDA device: {cuda.unavailable_reason()}", file=sys.stderr)
        return 2
    report: dict[str, Any] = {"environment": environment(), "errors": {}}
    print(json.dumps(report["environment"], indent=1), flush=True)
    if not args.skip_tests:
        report["tests"] = run_tests(args.out)
        print("tests:", report["tests"]["summary"], flush=True)
    steps = [
        ("copies", bench_copies),
        ("fused", lambda: bench_fused(report.get("copies", {}).get("d2d_GBps_read_plus_write"))),
        ("preprocess", lambda: bench_preprocess(args.seconds)),
        ("resnet", lambda: resnet.bench(args.seconds, support.build_models(Path(tempfile.mkdtemp(prefix="trtserve-resnet-"))))),
        ("server", lambda: resnet.bench_server(args.seconds, support.build_models(Path(tempfile.mkdtemp(prefix="trtserve-server-"))), support)),
        ("shm", lambda: shm_rows.bench_shm(args.seconds, support.build_models(Path(tempfile.mkdtemp(prefix="trtserve-shm-"))))),
    ]
    only = {name for name in args.only.split(",") if name}
    for name, step in steps:
        if only and name not in only:
            continue
        t0 = time.perf_counter()
        try:
            report[name] = step()
            print(f"{name}: done in {time.perf_counter() - t0:.1f} s", flush=True)
        except Exception:
            report["errors"][name] = traceback.format_exc()
            print(f"{name}: FAILED\n{report['errors'][name]}", flush=True)
        (args.out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    text = markdown(report)
    (args.out / "report.md").write_text(text)
    print(text, flush=True)
    tests_ok = args.skip_tests or report["tests"]["returncode"] == 0
    return 0 if tests_ok and not report["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
