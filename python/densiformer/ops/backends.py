"""Which kernel backends exist on this machine, and which one each op runs on.

Every op has a pure-PyTorch reference (`torch`). Compiled backends are added per op
as they are written; `IMPLEMENTED` lists them. Naming a backend that is missing
raises an error that says why; nothing falls back silently.
"""
from __future__ import annotations

import os

import torch

BACKENDS = ("torch", "cpu", "triton", "cuda")

# op name -> backends that have a kernel for it, fastest first.
IMPLEMENTED: dict[str, tuple[str, ...]] = {
    "masked_attention": ("torch",),
}


def _triton_status():
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        return True
    return "no GPU and TRITON_INTERPRET unset"


def available_backends() -> dict[str, object]:
    """{backend: True or the reason it cannot run here}."""
    return {
        "torch": True,
        "cpu": "the C++ CPU extension densiformer._C is not built yet (issue #4)",
        "triton": _triton_status(),
        "cuda": ("no CUDA GPU visible to torch" if not torch.cuda.is_available()
                 else "the CUDA extension densiformer._C_cuda is not built yet (issue #4)"),
    }


def resolve_backend(op: str, backend: str, device: torch.device) -> str:
    """The backend `op` will run on; ValueError/RuntimeError saying why if it cannot."""
    if backend not in BACKENDS + ("auto",):
        raise ValueError(f"unknown backend {backend!r}; choose one of {('auto',) + BACKENDS}")
    implemented = IMPLEMENTED[op]
    status = available_backends()
    if backend == "auto":
        for name in implemented:
            if status[name] is True and (name != "cuda" or device.type == "cuda"):
                return name
        return "torch"
    if status[backend] is not True:
        raise RuntimeError(f"backend {backend!r} is unavailable for {op}: {status[backend]}")
    if backend not in implemented:
        raise RuntimeError(f"backend {backend!r} has no {op} kernel yet; implemented: {list(implemented)}")
    return backend
