"""Suite-wide settings: one intra-op thread.

The tests run thousands of tiny convolutions; on 2 cores, thread hand-off costs more than
the work (measured ~20× slower for tiny convs on a loaded 2-core machine).
"""

import torch

torch.set_num_threads(1)
