"""One rank of the distributed tests, run by tests/test_distributed.py.

    mpiexec -n N python tests/_distributed_worker.py mpi
    python tests/_distributed_worker.py torch N      # spawns N gloo ranks on 127.0.0.1

Every rank builds the same shards from the same seed, so each can compute the
single-process reference (all shards in one list) by itself. A failed check
aborts the whole job (MPI Abort, or torch's spawn tearing the others down) so
the parent sees a non-zero exit instead of a hang. Importing this module
starts nothing.
"""
import math
import sys
import traceback

import numpy as np

import clipcore
from clipcore import distributed as D

P_VALUES = [2.0, 1.0, math.inf, 3.0]


def make_shards(size, seed=1):
    """Every rank's buffers (rank 2 holds none) and the replicated buffers, fresh each call."""
    rng = np.random.default_rng(seed)
    shards = []
    for r in range(size):
        base = rng.standard_normal((8, 6)).astype(np.float32)
        bufs = [rng.standard_normal((r + 3, 5)).astype(np.float32),
                rng.standard_normal(1000 + 37 * r),
                np.zeros(0, np.float32),
                None,
                base[::2, 1::2]]                 # a strided view into a larger array
        shards.append([] if r == 2 else bufs)
    replicated = [(rng.standard_normal(7) * 3).astype(np.float32), rng.standard_normal((3, 3)) * 3]
    return shards, replicated


def scaled_shards(size, scale):
    """make_shards in float64, times scale."""
    shards, rep = make_shards(size)
    return ([[b.astype(np.float64) * scale for b in s if b is not None] for s in shards],
            [b.astype(np.float64) * scale for b in rep])


def flat(shards):
    return [b for s in shards for b in s]


def copies(buffers):
    return [None if b is None else b.copy() for b in buffers]


def check_close(got, ref, what, rel=1e-12):
    if not (got == ref or abs(got - ref) <= rel * abs(ref)):
        raise AssertionError(f"{what}: {got!r} != {ref!r}")


def check_same_everywhere(be, value, what):
    seen = be.allgather(repr(value))
    if len(set(seen)) != 1:
        raise AssertionError(f"{what}: ranks disagree: {seen}")


def check_equal_buffers(got, ref, what):
    for i, (g, r) in enumerate(zip(got, ref)):
        if g is None:
            continue
        g, r = np.asarray(g), np.asarray(r)
        if g.dtype != r.dtype or g.shape != r.shape or not np.array_equal(g, r, equal_nan=True):
            raise AssertionError(f"{what}[{i}]: {g!r} != {r!r}")


def check_close_buffers(got, ref, what):
    for i, (g, r) in enumerate(zip(got, ref)):
        if g is None:
            continue
        rtol = 1e-6 if g.dtype == np.float32 else 1e-12
        np.testing.assert_allclose(g, r, rtol=rtol, atol=0, err_msg=f"{what}[{i}]")


def raised(fn, exc_type, text):
    """Whether fn raises exc_type with text in its message.

    Only the verdict leaves this frame: a caller's local holding the
    exception (whose traceback holds the caller's frame) would make a cycle
    that keeps the process group alive until interpreter exit, where tearing
    down gloo's threads can abort the process.
    """
    try:
        fn()
    except exc_type as exc:
        return text in str(exc)
    except Exception:
        traceback.print_exc()
    return False


def check_raises_everywhere(be, fn, bad_rank, exc_type, message):
    """fn raises exc_type on bad_rank and RuntimeError elsewhere, and nobody hangs."""
    if be.rank == bad_rank:
        expected, text = exc_type, message
    else:
        expected, text = RuntimeError, "another rank of the group rejected its arguments"
    if not raised(fn, expected, text):
        raise AssertionError(f"rank {be.rank}: expected {expected.__name__}({text!r})")


# --- the checks ---------------------------------------------------------------------

def check_norms_and_clips(be, group, wrap):
    rank, size = be.rank, be.size
    shards, rep = make_shards(size)
    for p in P_VALUES:
        ref = clipcore.global_norm(flat(shards), norm_type=p)
        got = D.global_norm(wrap(shards[rank]), group, norm_type=p)
        check_close(got, ref, f"global_norm p={p}")
        check_same_everywhere(be, got, f"global_norm p={p}")

        # Clipping: half the norm, so every buffer is scaled.
        clip = ref / 2
        everything, _ = make_shards(size)
        clipcore.clip_by_global_norm_(flat(everything), clip, norm_type=p)
        mine, _ = make_shards(size)
        same_scale, _ = make_shards(size)
        returned = D.clip_by_global_norm_(wrap(mine[rank]), clip, group, norm_type=p)
        if returned != got:
            raise AssertionError(f"clip returned {returned!r}, global_norm gave {got!r}")
        clipcore.clip_by_global_norm_(same_scale[rank], clip, use_norm=returned, norm_type=p)
        check_equal_buffers(mine[rank], same_scale[rank], f"clip p={p} vs local clip of shard")
        check_close_buffers(mine[rank], everything[rank], f"clip p={p} vs one-process clip")

        # Above the norm: nothing is written.
        mine, _ = make_shards(size)
        fresh, _ = make_shards(size)
        D.clip_by_global_norm_(wrap(mine[rank]), ref * 2, group, norm_type=p)
        check_equal_buffers(mine[rank], fresh[rank], f"no clip p={p}")


def check_replicated(be, group, wrap):
    rank, size = be.rank, be.size
    for p in P_VALUES:
        shards, rep = make_shards(size)
        ref = clipcore.global_norm(flat(shards) + rep, norm_type=p)
        per_rank = clipcore.global_norm(flat(shards) + rep * size, norm_type=p)
        if p != math.inf and not abs(per_rank - ref) > 1e-3 * ref:
            raise AssertionError("replicated buffers too small to tell once from per rank")
        got = D.global_norm(wrap(shards[rank]), group, norm_type=p, replicated=wrap(rep))
        check_close(got, ref, f"global_norm replicated p={p}")
        check_same_everywhere(be, got, f"global_norm replicated p={p}")

        everything, every_rep = make_shards(size)
        clipcore.clip_by_global_norm_(flat(everything) + every_rep, ref / 3, norm_type=p)
        mine, my_rep = make_shards(size)
        returned = D.clip_by_global_norm_(wrap(mine[rank]), ref / 3, group, norm_type=p,
                                          replicated=wrap(my_rep))
        check_close(returned, ref, f"clip replicated p={p}")
        check_close_buffers(mine[rank], everything[rank], f"clip replicated p={p} shard")
        check_close_buffers(my_rep, every_rep, f"clip replicated p={p} replicated")


def check_nonfinite(be, group, wrap):
    rank, size = be.rank, be.size
    cases = [("inf on the last rank", {size - 1: math.inf}, math.inf),
             ("nan on rank 1", {1: math.nan}, math.nan),
             ("nan on rank 0, inf on rank 1", {0: math.nan, 1: math.inf}, math.nan),
             ("-inf on rank 0", {0: -math.inf}, math.inf)]
    for what, poison, expected in cases:
        for p in P_VALUES:
            shards, rep = make_shards(size)
            for r, value in poison.items():
                shards[r][1][5] = value
            got = D.global_norm(wrap(shards[rank]), group, norm_type=p, replicated=rep)
            if not (got == expected or (math.isnan(expected) and math.isnan(got))):
                raise AssertionError(f"{what}, p={p}: global_norm gave {got!r}")

            # error_if_nonfinite: a ValueError on every rank, nothing written anywhere.
            before = copies(shards[rank] + rep)
            if not raised(lambda: D.clip_by_global_norm_(wrap(shards[rank]), 1.0, group,
                                                         norm_type=p, replicated=rep,
                                                         error_if_nonfinite=True),
                          ValueError, "not finite"):
                raise AssertionError(f"{what}, p={p}: rank {rank} did not raise ValueError")
            check_equal_buffers(shards[rank] + rep, before, f"{what}: after the error")

            # TensorFlow's rule: every element on every rank becomes NaN.
            returned = D.clip_by_global_norm_(wrap(shards[rank]), 1.0, group, norm_type=p,
                                              replicated=wrap(rep))
            check_same_everywhere(be, returned, f"{what}: returned norm")
            for b in shards[rank] + rep:
                if b is not None and b.size and not np.isnan(b).all():
                    raise AssertionError(f"{what}, p={p}: a buffer kept non-NaN elements")

    # A non-finite replicated copy on one rank only still reaches every rank.
    shards, rep = make_shards(size)
    if rank == size - 1:
        rep[0][2] = math.inf
    for p in P_VALUES:
        got = D.global_norm(wrap(shards[rank]), group, norm_type=p, replicated=wrap(rep))
        if got != math.inf:
            raise AssertionError(f"inf in rank {size - 1}'s replicated copy, p={p}: {got!r}")


def check_bad_input_on_one_rank(be, group, wrap):
    rank, size = be.rank, be.size
    last = size - 1

    def fresh():
        shards, rep = make_shards(size)
        return shards[rank], rep

    def both(make_args, bad_rank, exc_type, message, p=2.0, clip=True):
        mine, rep = fresh()
        before = copies(mine + rep)
        t_list, kwargs = make_args(mine, rep)
        kwargs.setdefault("norm_type", p)
        if clip:
            clip_norm = kwargs.pop("clip_norm", 1e-3)
            check_raises_everywhere(
                be, lambda: D.clip_by_global_norm_(t_list, clip_norm, group, **kwargs),
                bad_rank, exc_type, message)
        else:
            check_raises_everywhere(be, lambda: D.global_norm(t_list, group, **kwargs),
                                    bad_rank, exc_type, message)
        check_equal_buffers(mine + rep, before, "after a failed call")

    def int_entry(mine, rep):
        return (mine + [np.arange(3)] if rank == 1 else mine), {"replicated": rep}

    def read_only(mine, rep):
        if rank == 0:
            mine[0].flags.writeable = False
        return mine, {}

    def negative_clip(mine, rep):
        return mine, {"clip_norm": -1.0 if rank == last else 1e-3}

    def bad_norm_type(mine, rep):
        return mine, {"norm_type": "two" if rank == last else math.inf}

    def bad_replicated(mine, rep):
        return mine, {"replicated": rep + [np.arange(2)] if rank == 0 else rep}

    def shared_memory(mine, rep):
        return mine, {"replicated": [mine[1][:10]] + rep if rank == last else rep}

    def not_a_list(mine, rep):
        return (mine[1] if rank == 1 else mine), {}

    def replicated_not_a_list(mine, rep):
        return mine, {"replicated": rep[0] if rank == 1 else rep}

    for p in P_VALUES:
        for clip in (True, False):
            both(int_entry, 1, TypeError, "t_list[5]: expected a floating-point", p, clip)
            both(bad_replicated, 0, TypeError, "replicated[2]: expected a floating-point", p, clip)
            both(not_a_list, 1, TypeError, "t_list must be a list or tuple", p, clip)
            both(replicated_not_a_list, 1, TypeError,
                 "replicated must be a list or tuple of arrays, got ndarray", p, clip)
        both(read_only, 0, ValueError, "t_list[0]: expected a writable", p)
        both(negative_clip, last, ValueError, "clip_norm must be", p)
        both(shared_memory, last, ValueError, "t_list[1] and replicated[0] share memory", p)
    both(bad_norm_type, last, TypeError, "norm_type must be a real number", clip=False)
    both(bad_norm_type, last, TypeError, "norm_type must be a real number")

    # The group is still in step: a normal call works and agrees.
    shards, _ = make_shards(size)
    got = D.global_norm(wrap(shards[rank]), group)
    check_close(got, clipcore.global_norm(flat(shards)), "after the failures")


def check_scaled_sum(be, group, wrap):
    """Large and tiny float64 norms: for p = 3 (and 2) the plain sum of powers over- or underflows."""
    rank, size = be.rank, be.size
    for scale in (1e150, 1e-120, 1e-300):
        shards, rep = scaled_shards(size, scale)
        for p in (3.0, 2.5, 2.0):
            ref = clipcore.global_norm(flat(shards) + rep, norm_type=p)
            got = D.global_norm(wrap(shards[rank]), group, norm_type=p, replicated=wrap(rep))
            check_close(got, ref, f"scale {scale}, p={p}")
            check_same_everywhere(be, got, f"scale {scale}, p={p}")
    # For p = 1 the core adds |x| unscaled: a sum over ranks that overflows gives
    # inf, as one process would, even when each rank's part is finite. For p = 2
    # the norm is finite: the squares of the ranks' parts are summed scaled.
    value = 0.6 * sys.float_info.max
    shards = [[np.array([value])] for _ in range(size)]
    ref = clipcore.global_norm(flat(shards), norm_type=1.0)
    got = D.global_norm(shards[rank], group, norm_type=1.0)
    if not (math.isfinite(clipcore.global_norm(shards[rank], norm_type=1.0))
            and ref == got == math.inf):
        raise AssertionError(f"p=1, overflowing sum: {got!r}, one process: {ref!r}")
    shards = [[np.array([math.sqrt(value)])] for _ in range(size)]
    got = D.global_norm(shards[rank], group)
    check_close(got, clipcore.global_norm(flat(shards)), "p=2, squares beyond float64")
    check_same_everywhere(be, got, "p=2, squares beyond float64")


def check_subgroup(be, sub, sub_members, wrap):
    shards, _ = make_shards(be.size)
    ref = clipcore.global_norm(flat(shards[r] for r in sub_members))
    check_close(D.global_norm(wrap(shards[be.rank]), sub), ref, "sub-group norm")


def check_collectives(be, counting):
    """All-reduce sizes per call: one number in the common case (mpi4py only: a counting comm)."""
    rank, size = be.rank, be.size
    calls = counting.calls

    def sizes(fn):
        calls.clear()
        fn()
        return list(calls)

    shards, rep = make_shards(size)
    for p in P_VALUES:
        for fn in (lambda: D.global_norm(shards[rank], counting, norm_type=p, replicated=rep),
                   lambda: D.clip_by_global_norm_(shards[rank], 1e9, counting, norm_type=p)):
            got = sizes(fn)
            if got != [1]:
                raise AssertionError(f"p={p}: all-reduces of {got} numbers, not one of 1")
        shards[size - 1][1][0] = math.inf        # settled by a second all-reduce of 2
        got = sizes(lambda: D.global_norm(shards[rank], counting, norm_type=p))
        shards[size - 1][1][0] = 0.5
        if got != [1, 2]:
            raise AssertionError(f"inf, p={p}: all-reduces of {got} numbers")
        bad = shards[rank] + [np.arange(2)] if rank == 0 else shards[rank]
        got = sizes(lambda: raised(lambda: D.global_norm(bad, counting, norm_type=p),
                                   Exception, ""))
        if got != [1, 2]:
            raise AssertionError(f"a failed rank, p={p}: all-reduces of {got} numbers")
    big, _ = scaled_shards(size, 1e150)          # the scaled sum: a third all-reduce
    if sizes(lambda: D.global_norm(big[rank], counting, norm_type=3.0)) != [1, 2, 1]:
        raise AssertionError(f"scaled sum: all-reduces of {calls} numbers")


def check_wrong_group_types(bad_groups):
    for bad in bad_groups + [object(), "world", 0, np.zeros(2)]:
        for call in (lambda: D.global_norm([np.ones(3)], bad),
                     lambda: D.clip_by_global_norm_([np.ones(3)], 1.0, bad)):
            if not raised(call, TypeError, "group must be"):
                raise AssertionError(f"group={bad!r}: no TypeError")


def run_all(be, group, wrap, bad_groups, sub, sub_members):
    check_wrong_group_types(bad_groups)
    check_norms_and_clips(be, group, wrap)
    check_replicated(be, group, wrap)
    check_nonfinite(be, group, wrap)
    check_bad_input_on_one_rank(be, group, wrap)
    check_scaled_sum(be, group, wrap)
    check_subgroup(be, sub, sub_members, wrap)


# --- the backends -------------------------------------------------------------------

def run_mpi():
    from mpi4py import MPI

    class Backend:
        rank = MPI.COMM_WORLD.Get_rank()
        size = MPI.COMM_WORLD.Get_size()

        def allgather(self, x):
            return MPI.COMM_WORLD.allgather(x)

    class Counting(MPI.Intracomm):
        """COMM_WORLD, recording the size of every Allreduce."""
        calls = []

        def Allreduce(self, sendbuf, recvbuf, op=MPI.SUM):
            self.calls.append(len(recvbuf))
            return super().Allreduce(sendbuf, recvbuf, op)

    be = Backend()
    world = MPI.COMM_WORLD
    try:
        check_collectives(be, Counting(world))
        half = world.Split(be.rank % 2, be.rank)
        inter = half.Create_intercomm(0, world, 1 - be.rank % 2, tag=7)
        members = [r for r in range(be.size) if r % 2 == be.rank % 2]
        run_all(be, world, lambda ts: ts, [MPI.SUM, MPI.COMM_NULL, MPI.DOUBLE, inter],
                half, members)
        inter.Free()
        half.Free()
    except BaseException:
        print(f"rank {be.rank}/{be.size} failed:", file=sys.stderr)
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        world.Abort(1)
    print(f"rank {be.rank}/{be.size}: ok", flush=True)


def torch_rank(rank, size, port):
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=size)

    class Backend:
        def allgather(self, x):
            out = [None] * size
            dist.all_gather_object(out, x)
            return out

    be = Backend()
    be.rank, be.size = rank, size
    evens = dist.new_group([r for r in range(size) if r % 2 == 0])
    odds = dist.new_group([r for r in range(size) if r % 2 == 1])
    outsider = dist.new_group([0])
    members = [r for r in range(size) if r % 2 == rank % 2]

    def wrap(t_list):       # the rank's buffers as torch tensors over the same memory
        return [None if b is None else torch.from_numpy(b) for b in t_list]

    bad = [torch.zeros(2), dist.ReduceOp.SUM] + ([outsider] if rank != 0 else [])
    run_all(be, dist.group.WORLD, wrap, bad, evens if rank % 2 == 0 else odds, members)
    # group=None: torch's default group.
    shards, _ = make_shards(size)
    check_close(D.global_norm(wrap(shards[rank]), None), clipcore.global_norm(flat(shards)),
                "group=None")
    dist.barrier()
    dist.destroy_process_group()
    print(f"rank {rank}/{size}: ok", flush=True)


def run_torch(size):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(torch_rank, args=(size, port), nprocs=size)


if __name__ == "__main__":
    if sys.argv[1] == "mpi":
        run_mpi()
    else:
        run_torch(int(sys.argv[2]))
