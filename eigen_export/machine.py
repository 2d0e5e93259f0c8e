"""Where a number was measured: CPU/GPU names, library versions, the git commit (reports and benches)."""
from __future__ import annotations

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
