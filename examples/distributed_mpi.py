"""Clip gradients sharded over MPI ranks by their global norm.

Run with:  mpiexec -n 2 python examples/distributed_mpi.py

Each rank owns a shard of a model's weight gradients (as ZeRO/FSDP shard
them) plus a full copy of the small replicated ones (biases). clipcore
computes each rank's part with its fused kernels, all-reduces it once, and
every rank scales its own buffers by the same factor.
"""
import numpy as np
from mpi4py import MPI

import clipcore
from clipcore import distributed

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()

# Each rank's shard of two weight matrices' gradients: rows split across ranks.
rng = np.random.default_rng(rank)
shard = [rng.standard_normal((512 // size, 784)).astype(np.float32),
         rng.standard_normal((256 // size, 512)).astype(np.float32)]
# The biases' gradients are the same on every rank (already all-reduced by data
# parallelism): counted once in the norm, scaled on every rank.
biases = [np.full(512, 0.01, np.float32), np.full(256, 0.01, np.float32)]

local = clipcore.global_norm(shard)          # this rank's shard alone
before = distributed.global_norm(shard, comm, replicated=biases)
returned = distributed.clip_by_global_norm_(shard, 1.0, comm, replicated=biases)
after = distributed.global_norm(shard, comm, replicated=biases)

print(f"rank {rank}/{size}: shard norm {local:.2f}, global norm {returned:.2f}, "
      f"after clipping to 1.0: {after:.6f}", flush=True)
assert returned == before and abs(after - 1.0) < 1e-5
