"""pytest settings for the scripts' tests: the repository on the import path (train.py, toy.py, isoloss.py), and
one intra-op thread per test process. Results then do not depend on the core count (summation order), and
`pytest -n N` on a many-core machine does not run N x cores threads; on a busy machine, several threads per
process slow torch's small ops down many times."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(1)
