"""What a benchmark result must carry to be read later: machine, versions, date, load.

Every JSON and CSV row written by fastsam-bench includes these fields, so a number never
travels without the device, driver, torch/triton versions and date it was measured with.
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess
import sys
from importlib import metadata
from typing import Optional

import torch


def _version(package: str) -> Optional[str]:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def cuda_driver_version() -> Optional[str]:
    """The NVIDIA driver version (from nvidia-smi), or None where it cannot be found."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
        return out.strip().splitlines()[0].strip() or None
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def _git_commit() -> Optional[str]:
    # A copy of the tree whose .git is not the source's (the lent GPU machines got a stale
    # one) cannot say what code ran: the caller can, with FASTSAM_GIT_COMMIT.
    if os.environ.get("FASTSAM_GIT_COMMIT"):
        return os.environ["FASTSAM_GIT_COMMIT"]
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "") if commit else None


def load_average() -> Optional[list]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def environment(device: torch.device) -> dict:
    """Machine, versions and date of a run on ``device``."""
    import fastsam

    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device_type": device.type,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "fastsam": fastsam.__version__,
        "git_commit": _git_commit(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": load_average(),
        "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update({
            "device_name": props.name,
            "driver": cuda_driver_version(),
            "capability": f"{props.major}.{props.minor}",
            "device_memory_GiB": round(props.total_memory / 2**30, 1),
        })
    else:
        threads = env["torch_threads"]
        env.update({"device_name": f"{env['cpu']} ({threads} thread{'s' if threads != 1 else ''})", "driver": None})
    return env


def run_slug(env: dict) -> str:
    """A folder name for a run: device and date, e.g. 'nvidia-h100-80gb-hbm3-2026-11-26'."""
    name = env["device_name"] if env["device_type"] == "cuda" else f"cpu-{env['cpu']}-{env['cpu_count']}core"
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return f"{slug}-{env['date'][:10]}"
