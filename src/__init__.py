"""Atlas: retrieval-augmented few-shot learning (Contriever retriever + Fusion-in-Decoder T5 reader)."""

import os

# OpenMP threads that spin while waiting made every small matmul take ~15 ms on the 2-vCPU VMs we measured (1.1 ms
# with passive waiting, a 15x faster training step; large matmuls are unaffected). It must be set before torch
# initialises OpenMP, i.e. before torch is imported; an explicit user setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
