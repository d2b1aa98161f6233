"""clipcore's command line: ``python -m clipcore bench`` and ``python -m clipcore demo``.

Also installed as the ``clipcore`` console script.
"""
import argparse
import os
import sys

QUICK_REPEAT, FULL_REPEAT = 5, 15


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def build_parser():
    """The argument parser of the ``clipcore`` command."""
    from clipcore import bench

    parser = argparse.ArgumentParser(
        prog="clipcore", description="clipcore: gradient clipping by fused Cython/OpenMP kernels.")
    sub = parser.add_subparsers(dest="command", metavar="{bench,demo}")
    sub.required = True

    b = sub.add_parser(
        "bench", help="time clipcore against NumPy, PyTorch and TensorFlow on real model shapes",
        description="Clip the core workloads (MNIST MLP, 2000x512, ResNet-50, GPT-2 small, "
                    "GPT-2 in bfloat16), run the elementwise ops, AGC on ResNet-50 and DP-SGD's "
                    "per-example clip on the MLP's batch of 64, with clipcore and with NumPy, "
                    "PyTorch, TensorFlow and "
                    "JAX (when installed), each family in a worker process of its own, and "
                    "measure the memory-bandwidth ceiling alongside: in rounds, each asking "
                    "every implementation in turn for a few timed calls, so that ratios are "
                    "taken within a round; print a table and write results.json, table.txt "
                    "and chart.png.")
    b.add_argument("--quick", action="store_true",
                   help=f"{QUICK_REPEAT} timed calls per row instead of {FULL_REPEAT}")
    b.add_argument("--workload", action="append", metavar="NAME",
                   help="run only these (repeat or comma-separate): "
                        + ", ".join(sorted(set(bench.DATA) | {c.key for c in bench.CASES})))
    b.add_argument("--threads", type=_positive_int, metavar="N",
                   help="threads for every implementation (default: one thread, then what "
                        "OpenMP may use, each against its own ceiling)")
    b.add_argument("--contend", action="store_true",
                   help="keep one core busy with another process while timing everyone")
    b.add_argument("--repeat", type=_positive_int, metavar="N",
                   help="timed calls per row, in rounds of up to "
                        f"{bench.runner.CALLS_PER_ROUND} (the median and range are reported)")
    b.add_argument("--out", metavar="DIR",
                   help="folder for results.json, table.txt and chart.png "
                        "(default: ./bench-results-<date>-<time>)")
    b.set_defaults(subparser=b)

    d = sub.add_parser(
        "demo", help="the lesson: an MLP that blows up without clipping and trains with it",
        description="Train the MLP 784-256-128-10 with plain SGD at lr=1 on synthetic digits, "
                    "first without clipping, then with clipcore.clip_by_global_norm_(grads, 15).")
    d.add_argument("--epochs", type=_positive_int, default=8, metavar="N",
                   help="epochs per run (default 8)")
    d.add_argument("--plot", metavar="FILE", help="write the two loss curves to FILE (PNG)")
    d.set_defaults(subparser=d)
    return parser


def _bench(args, parser, argv):
    from clipcore import bench, kernels

    names = [n.strip() for arg in (args.workload or []) for n in arg.split(",") if n.strip()]
    try:
        cases = bench.select_cases(names)
    except ValueError as exc:
        parser.error(f"--workload: {exc}")
    out = args.out or bench.default_out_dir()
    try:
        bench.check_out_dir(out)
    except OSError as exc:
        parser.error(f"--out {out!r}: cannot write there ({exc.strerror or exc})")
    repeat = args.repeat or (QUICK_REPEAT if args.quick else FULL_REPEAT)
    threads = args.threads or kernels.max_threads()
    return bench.main(cases=cases, threads=threads, repeat=repeat, warmup=1 if args.quick else 2,
                      out=out, quick=args.quick, argv=argv, one_thread=args.threads is None,
                      contend=args.contend)


def _demo(args, parser):
    from clipcore import demo

    if args.plot:
        try:
            demo.check_plot_path(args.plot)
        except (OSError, ImportError) as exc:
            parser.error(f"--plot {args.plot!r}: {exc}")
    return demo.main(epochs=args.epochs, plot=args.plot)


def main(argv=None):
    """Run the ``clipcore`` command with argv (default: sys.argv[1:]); returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "bench":
            return _bench(args, args.subparser, argv)
        return _demo(args, args.subparser)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`clipcore demo | head`): stop quietly.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
