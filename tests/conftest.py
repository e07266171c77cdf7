"""Suite-wide settings: one torch thread (tiny models run faster and steadier on 2 cores)."""

import torch

torch.set_num_threads(1)
