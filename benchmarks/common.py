"""Shared by the benchmark scripts: device description, timing, and JSON results."""
from __future__ import annotations

import json
import os
import platform
import shlex
import sys
from pathlib import Path

import torch

from densiformer.bench import best_time, cpu_name  # noqa: F401 (best_time: for the scripts)

RESULTS = Path(__file__).parent / "results"


def device_info(device: torch.device) -> dict:
    info = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "python": platform.python_version(), "machine": platform.machine()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    else:
        info["cpu"] = cpu_name()
        info["cores"] = os.cpu_count()
    return info


def write_result(name: str, payload: dict, out: str | None) -> Path:
    path = Path(out) if out else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "command": " ".join(shlex.quote(a) for a in sys.argv), **payload}
    path.write_text(json.dumps(payload, indent=2))
    print(f"results written to {path}")
    return path
