"""pytest settings for every test file: one intra-op thread per test process. Results then do not depend on
the core count (summation order), and `pytest -n N` on a many-core machine does not run N x cores threads;
on a busy machine, several threads per process slow torch's small ops down many times."""
import torch

torch.set_num_threads(1)
