"""Where a number was measured: CPU/GPU names, library versions, the git commit (reports and benches)."""
from __future__ import annotations

import ctypes
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def machine() -> dict:
    import torch

    try:
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), platform.processor())
    except OSError:
        cpu = platform.processor()
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "host": platform.node()}
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        info |= {"gpu": torch.cuda.get_device_name(), "compute_capability": f"sm_{major}{minor}"}
    return info


def versions(packages=("eigen_export", "torch", "transformers", "onnx", "onnxruntime", "onnxruntime-extensions",
                       "polygraphy", "triton", "tensorrt")) -> dict:
    found = {"python": platform.python_version()}
    for name in packages:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# glibc's mallopt parameter number for M_MMAP_THRESHOLD (malloc.h)
_M_MMAP_THRESHOLD = -3


def return_freed_memory(threshold: int = 1 << 20) -> bool:
    """Serve allocations above `threshold` bytes from their own mappings, so that a freed model or engine goes
    back to the OS. glibc's default threshold rises with each large free, after which freed weights and logits
    stay in the heap: a validate run that frees each model before loading the next peaked ~0.5 GB higher
    without this (like MALLOC_MMAP_THRESHOLD_ in the environment). False where the C library is not glibc."""
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold)) if hasattr(libc, "mallopt") else False
    except OSError:
        return False
