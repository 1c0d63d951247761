"""Test-wide settings: tiny models gain nothing from intra-op threads, and on a shared 2-core machine
spinning OpenMP workers slow every test down, so the suite runs torch single-threaded."""

import torch

torch.set_num_threads(1)
