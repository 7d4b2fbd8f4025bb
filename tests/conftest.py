import os

import pytest
import torch

# Small, deterministic CPU runs: two threads match the CI machine.
torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: trains a model for tens of seconds")
