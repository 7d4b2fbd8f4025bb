"""Which kernel backends exist on this machine, and which one each op runs on.

Every op has a pure-PyTorch reference (`torch`). Compiled backends are added per op
as they are written; `IMPLEMENTED` lists them. Naming a backend that is missing
raises an error that says why; nothing falls back silently.

The extensions densiformer._C (C++ CPU) and densiformer._C_cuda (CUDA C++) are
imported on first use, never at package import, so `import densiformer` works (and
builds nothing) where they were not compiled or no GPU is present.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os

import torch

BACKENDS = ("torch", "cpu", "triton", "cuda")

# op name -> backends that have a kernel for it, fastest first.
IMPLEMENTED: dict[str, tuple[str, ...]] = {
    "masked_attention": ("cuda", "triton", "torch"),
    "head_sample_loop": ("cuda", "cpu", "triton", "torch"),
    "head_log_prob": ("cpu", "triton", "torch"),
}


@functools.cache
def _import_cpu_extension():
    """(module, None) or (None, why it cannot be imported)."""
    try:
        return importlib.import_module("densiformer._C"), None
    except ImportError as err:
        return None, (f"the C++ extension densiformer._C is not built or does not load ({err}); "
                      "rebuild it with `pip install -e .` in the repository")


def cpu_extension():
    """The densiformer._C module; RuntimeError saying how to rebuild it if it is missing."""
    module, why = _import_cpu_extension()
    if module is None:
        raise RuntimeError(why)
    return module


@functools.cache
def _import_cuda_extension():
    """(module, None) or (None, why it cannot be imported or run)."""
    try:
        module = importlib.import_module("densiformer._C_cuda")
    except ImportError as err:
        return None, (f"densiformer._C_cuda not built or does not load ({err}); rebuild it with "
                      "`DENSIFORMER_CUDA=1 pip install -e .` in the repository (needs nvcc)")
    # The module has its own CUDA runtime (linked statically): it must see the GPU too,
    # e.g. the driver must be new enough for the CUDA version it was built with.
    problem = module.runtime_status()
    if problem:
        return None, problem
    return module, None


def cuda_extension():
    """The densiformer._C_cuda module; RuntimeError saying why if it is missing or sees no GPU."""
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA GPU visible to torch")
    module, why = _import_cuda_extension()
    if module is None:
        raise RuntimeError(why)
    return module


def _cuda_status():
    if not torch.cuda.is_available():
        return "no CUDA GPU visible to torch"
    return _import_cuda_extension()[1] or True


def _triton_status():
    # find_spec, not import: importing triton is slow, and it must happen after
    # TRITON_INTERPRET is set for the interpreter to take over its kernels.
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        return True
    return "no GPU and TRITON_INTERPRET unset"


def _constant_under_compile(fn):
    """Mark fn as torch.compiler.assume_constant_result does: torch.compile calls it once while
    tracing and keeps the answer as a constant, where tracing into it would break the graph
    at importlib (the extensions' first import). Set by hand because that function imports
    torch._dynamo, and with it triton, which `import densiformer` must not."""
    fn._dynamo_marked_constant = True
    return fn


@_constant_under_compile
def available_backends() -> dict[str, object]:
    """{backend: True or the reason it cannot run here}."""
    return {
        "torch": True,
        "cpu": _import_cpu_extension()[1] or True,
        "triton": _triton_status(),
        "cuda": _cuda_status(),
    }


def _device_problem(backend: str, device: torch.device) -> str | None:
    """Why `backend` cannot take tensors on `device`, or None if it can."""
    if backend == "cpu" and device.type != "cpu":
        return f"the cpu backend takes CPU tensors, got {device}"
    if backend == "cuda" and device.type != "cuda":
        return f"the cuda backend takes CUDA tensors, got {device}"
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return f"the triton backend takes CUDA tensors (CPU tensors only with TRITON_INTERPRET=1), got {device}"
    return None


@_constant_under_compile
def resolve_backend(op: str, backend: str, device: torch.device) -> str:
    """The backend `op` will run on; ValueError/RuntimeError saying why if it cannot."""
    if backend not in BACKENDS + ("auto",):
        raise ValueError(f"unknown backend {backend!r}; choose one of {('auto',) + BACKENDS}")
    implemented = IMPLEMENTED[op]
    status = available_backends()
    if backend == "auto":
        # Never the Triton interpreter: on CPU tensors it is far slower than the reference.
        for name in implemented:
            if (status[name] is True and _device_problem(name, device) is None
                    and not (name == "triton" and device.type != "cuda")):
                return name
        return "torch"
    if status[backend] is not True:
        raise RuntimeError(f"backend {backend!r} is unavailable for {op}: {status[backend]}")
    if backend not in implemented:
        raise RuntimeError(f"backend {backend!r} has no {op} kernel yet; implemented: {list(implemented)}")
    problem = _device_problem(backend, device)
    if problem is not None:
        raise RuntimeError(f"backend {backend!r} cannot run {op} here: {problem}")
    return backend
