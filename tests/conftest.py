import os

import numpy as np
import pandas as pd
import pytest
import torch

# Small, deterministic CPU runs: two threads match the CI machine.
torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: trains a model for tens of seconds")


def small_table(n=600, seed=0):
    """Two inputs a, b and two targets y = a + noise, z = 3 b + 10."""
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=n), rng.normal(size=n)
    return pd.DataFrame({"a": a, "b": b, "y": a + 0.1 * rng.normal(size=n), "z": b * 3 + 10})


def skip_unless_backend(backend):
    """Skip unless `backend` runs here; Triton on the CPU also needs TRITON_INTERPRET=1 set
    before triton was first imported."""
    from densiformer.ops import backends

    status = backends.available_backends()[backend]
    if status is not True:
        pytest.skip(f"{backend} backend unavailable: {status}")
    if backend == "triton" and not torch.cuda.is_available():
        import triton.language as tl

        if type(tl.zeros).__name__ != "InterpretedFunction":
            pytest.skip("triton was imported before TRITON_INTERPRET=1 was set; run this module on its own")


@pytest.fixture(scope="session")
def tiny_estimator():
    """A barely trained model: for API behaviour, not for accuracy."""
    import densiformer as dfm

    est = dfm.DensityEstimator(["a", "b"], ["y", "z"],
                               dfm.ModelConfig(d_model=16, heads=2, head_width=32, head_layers=2))
    return est.fit(small_table(), epochs=1, batch_size=128, seed=0, progress=False)
