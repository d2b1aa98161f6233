"""clipcore.distributed against its floor: the local call plus one scalar all-reduce.

    mpiexec -n 2 python benchmarks/bench_distributed.py [--quick] [--workload NAME ...]
    python benchmarks/bench_distributed.py --gloo [--quick]   # torch.distributed, 2 ranks

Each rank holds an FSDP-style shard (1/N of every tensor, flattened) of a
model's float32 gradients. Per repetition, interleaved: every rank restores its
shard from a saved copy (not timed; every call clips), the ranks meet at a
barrier, then each times one call (the order rotates between repetitions):

  distributed    clipcore.distributed.clip_by_global_norm_(shard, c, group)
  local+scalar   clipcore.clip_by_global_norm_(shard, c) and one all-reduce
                 of a float64 scalar (the floor the issue sets; it does not
                 compute the global norm)
  hand-rolled    the least a p=2 version does with the public API: a
                 clipcore.Plan, its norm, an all-reduce of the square, the
                 plan's clip with use_norm= (no agreement across ranks on
                 bad input, no p other than 1 and 2, no replicated buffers)
  local          clipcore.clip_by_global_norm_(shard, c) alone
  scalar         the all-reduce of one float64 alone

"distributed" and "hand-rolled" both put the all-reduce between the norm
and the scaling pass, which must wait for it; on a machine with as many
ranks as cores, the scaling pass then shares the cores with the
communication threads that are still winding down (gloo's especially).

A step costs what its slowest rank costs: each repetition counts the max over
ranks, and the table shows medians of those. Kernels run on --threads threads
per rank (default 1: 2 ranks on a 2-core machine).
"""
import argparse
import statistics
import sys
import time

import numpy as np

import clipcore
from clipcore import distributed
from clipcore import workloads


WORKLOADS = {"mnist_mlp": workloads.shapes("mlp"), "2000x512": workloads.shapes("2000x512"),
             "resnet50": workloads.shapes("resnet50")}
REPEATS = {"mnist_mlp": 400, "2000x512": 200, "resnet50": 40}


def make_shard(shapes, rank, size, seed=0):
    """This rank's 1/size of every tensor, as FSDP flattens and shards them."""
    rng = np.random.default_rng(seed)
    shard = []
    for shape in shapes:
        n = int(np.prod(shape))
        lo, hi = rank * n // size, (rank + 1) * n // size
        full = rng.standard_normal(n, dtype=np.float32)    # same draws on every rank
        shard.append(full[lo:hi].copy())
    return shard


def measure(comm, shapes, repeats, n_threads):
    """Per-repetition times (s) of each call on this rank."""
    shard = make_shard(shapes, comm.rank, comm.size)
    saved = [a.copy() for a in shard]
    clip = distributed.global_norm(shard, comm.group) / 2      # every call clips
    one = np.zeros(1)

    def restore():
        for a, s in zip(shard, saved):
            np.copyto(a, s)

    def dist_call():
        distributed.clip_by_global_norm_(shard, clip, comm.group, n_threads=n_threads)

    def local_scalar():
        clipcore.clip_by_global_norm_(shard, clip, n_threads=n_threads)
        comm.allreduce_scalar(one)

    def hand_rolled():
        plan = clipcore.Plan(shard, n_threads=n_threads)
        one[0] = plan.global_norm() ** 2
        comm.allreduce_scalar(one)
        plan.clip_by_global_norm_(clip, use_norm=float(one[0]) ** 0.5)

    def local():
        clipcore.clip_by_global_norm_(shard, clip, n_threads=n_threads)

    def scalar():
        comm.allreduce_scalar(one)

    calls = {"distributed": dist_call, "local+scalar": local_scalar,
             "hand-rolled": hand_rolled, "local": local, "scalar": scalar}
    times = {name: [] for name in calls}
    for _ in range(3):                     # warm up
        for fn in calls.values():
            restore()
            comm.barrier()
            fn()
    names = list(calls)
    for i in range(repeats):
        for name in names[i % len(names):] + names[:i % len(names)]:   # no call always first
            fn = calls[name]
            restore()
            comm.barrier()
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def report(comm, name, shapes, times):
    """Rank 0 prints medians over repetitions of the slowest rank's time."""
    every = comm.gather(times)
    if comm.rank != 0:
        return
    med = {}
    for call in times:
        slowest = np.max([t[call] for t in every], axis=0)
        med[call] = statistics.median(slowest) * 1e6
    n = sum(int(np.prod(s)) for s in shapes)
    print(f"{name:10s} {len(shapes):4d} tensors {n:>11,d} values: "
          + "  ".join(f"{call} {med[call]:8.1f} us" for call in med)
          + f"  | distributed / (local+scalar) {med['distributed'] / med['local+scalar']:.2f}"
          + f", / hand-rolled {med['distributed'] / med['hand-rolled']:.2f}", flush=True)


class MPIComm:
    def __init__(self):
        from mpi4py import MPI
        self.mpi, self.group = MPI, MPI.COMM_WORLD
        self.rank, self.size = self.group.Get_rank(), self.group.Get_size()

    def allreduce_scalar(self, one):
        self.group.Allreduce(self.mpi.IN_PLACE, one, op=self.mpi.SUM)

    def barrier(self):
        self.group.Barrier()

    def gather(self, obj):
        return self.group.gather(obj)


class GlooComm:
    def __init__(self, rank, size, port):
        import torch
        import torch.distributed as dist
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}",
                                rank=rank, world_size=size)
        self.torch, self.dist, self.group = torch, dist, dist.group.WORLD
        self.rank, self.size = rank, size

    def allreduce_scalar(self, one):
        self.dist.all_reduce(self.torch.from_numpy(one), group=self.group)

    def barrier(self):
        self.dist.barrier()

    def gather(self, obj):
        out = [None] * self.size
        self.dist.all_gather_object(out, obj)
        return out


def run(comm, args):
    if comm.rank == 0:
        backend = type(comm).__name__[:-4]
        print(f"clipcore.distributed, {backend}, {comm.size} ranks, {args.threads} thread(s) "
              f"per rank; medians over repetitions of the slowest rank's time", flush=True)
    for name in args.workload:
        repeats = max(5, REPEATS[name] // (8 if args.quick else 1))
        times = measure(comm, WORKLOADS[name], repeats, args.threads)
        report(comm, name, WORKLOADS[name], times)


def gloo_rank(rank, size, port, args):
    comm = GlooComm(rank, size, port)
    run(comm, args)
    comm.dist.barrier()
    comm.dist.destroy_process_group()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--workload", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    parser.add_argument("--threads", type=int, default=1, help="OpenMP threads per rank")
    parser.add_argument("--gloo", action="store_true",
                        help="torch.distributed with gloo on 127.0.0.1, 2 ranks (not mpiexec)")
    args = parser.parse_args(argv)
    if not args.gloo:
        run(MPIComm(), args)
        return
    import socket

    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(gloo_rank, args=(2, port, args), nprocs=2)


if __name__ == "__main__":
    main(sys.argv[1:])
