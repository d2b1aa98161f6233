"""The bench's report: the table it prints, the chart, the files it writes, and ``main``."""
import json
import math
import os
import sys
import tempfile
import time

from clipcore.bench import impls
from clipcore.bench.runner import CONTEND_NOTE, Contention, run


def _fmt_time(s):
    if s < 1e-3:
        return f"{s * 1e6:.1f} us"
    if s < 1:
        return f"{s * 1e3:.3g} ms" if s < 0.1 else f"{s * 1e3:.0f} ms"
    return f"{s:.2f} s"


def _fmt_time_range(lo, hi):
    """lo-hi in the unit _fmt_time gives hi: '20.1-24.3 ms'."""
    scale, unit = (1e6, "us") if hi < 1e-3 else (1e3, "ms") if hi < 1 else (1, "s")
    return f"{_fmt_num(lo * scale)}-{_fmt_num(hi * scale)} {unit}"


def _fmt_num(x):
    """x with 3 significant digits, 4 from 1000 up (2.30, 29.4, 102, 1234)."""
    x = float(f"{x:.3g}")           # 99.96 -> 100, not 100.0
    digits = 2 - math.floor(math.log10(abs(x))) if x else 2
    return f"{x:.{max(0, digits)}f}"


def _fmt_ratio(x):
    if x < 0.1:
        return f"{x:.3f}"
    return f"{x:.2f}" if x < 10 else (f"{x:.1f}" if x < 100 else f"{x:.0f}")


def _fmt_spread(s, fmt, unit):
    """A per-round ratio: its median, then its range over the rounds: '1.82x (1.70-1.95)'."""
    return f"{fmt(s['median'])}{unit} ({fmt(s['min'])}-{fmt(s['max'])})"


def _fmt_pct(x):
    return f"{x:.0f}"


def _fmt_bytes(n):
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} B"


def _status(name, r):
    return f"  {name:<15}{r['status']}" + (f": {r['message'][:70]}" if r.get("message") else "")


def format_table(results):
    """The results as a plain-text table (what the command prints)."""
    m = results["machine"]
    rounds = results["rounds"]
    lines = [f"clipcore {m['clipcore']} bench on {m['cpu']}: {m['logical_cpus']} logical CPUs "
             f"({m['available_cpus']} available), {results['threads']} thread"
             f"{'s' if results['threads'] > 1 else ''} for everyone"
             f"{CONTEND_NOTE if results.get('contend') else ''}, "
             f"OpenMP {'on' if m['openmp'] else 'off'}, SIMD {m['simd']}",
             f"median and range of {results['repeat']} timed calls per row, in {len(rounds)} "
             f"round{'s' if len(rounds) > 1 else ''} ({'+'.join(map(str, rounds))} calls), "
             f"each call on data restored from a backup (warm-up {results['warmup']}); "
             f"numpy {m['numpy']}, python {m['python']}"]
    for fam in impls.PEERS[1:]:
        f = results["families"].get(fam, {})
        if f.get("status") == "ok":
            lines[-1] += f", {fam} {f['version']}"
    other = m.get("other_load")
    load = (m.get("load_average") or [None])[0]
    if other is not None and other >= 0.2:
        lines.append(f"warning: other processes kept {other:.2f} CPUs busy during the run (of "
                     f"{m['available_cpus']}): they compete for the cores; timings may be off, "
                     f"threaded ones most")
    elif other is None and load is not None and load >= 1.0:
        lines.append(f"warning: the machine was busy before the run (load average {load:.2f} "
                     f"on {m['available_cpus']} CPUs): timings may be off")
    head = (f"  {'implementation':<15}{'call':<38}{'median':>10}{'range':>16}{'GB/s':>7}"
            f"{'% ceiling':>15}  speed-up of clipcore")
    for case in results["cases"]:
        lines += ["", f"{case['label']}: {case['tensors']} tensors, {case['values']:,} values "
                      f"({_fmt_bytes(case['bytes'])})", head]
        c = case["ceiling"]
        if c["status"] == "ok":
            lines.append(f"  {'ceiling':<15}{c['call']:<38}{_fmt_time(c['best_s']):>10}"
                         f"{_fmt_time_range(min(c['per_round_s']), max(c['per_round_s'])):>16}"
                         f"{c['gbps']:>7.1f}{'100%':>15}")
        else:
            lines.append(_status("ceiling", c))
        for impl, r in case["results"].items():
            if r["status"] != "ok":
                lines.append(_status(impl, r))
                continue
            pct = _fmt_spread(r["pct_ceiling"], _fmt_pct, "%") if r["pct_ceiling"] else ""
            row = (f"  {impl:<15}{r['call'][:37]:<38}{_fmt_time(r['median_s']):>10}"
                   f"{_fmt_time_range(r['min_s'], r['max_s']):>16}{r['gbps']:>7.1f}{pct:>15}")
            ups = case["speedup"].get(impl)
            if ups:
                row += "  " + ", ".join(
                    (f"{name.split()[-1]} " if name != "clipcore" else "")
                    + _fmt_spread(x, _fmt_ratio, "x") for name, x in ups.items())
            lines.append(row)
    lines += ["", "range: the fastest and the slowest call (ceiling: the fastest probe's median "
                  "in the fastest and in the slowest round).",
              "GB/s: the bytes the operation must move at least (clipping: read for the norm, "
              "read + write to scale) / median time.",
              "ceiling: the fastest bandwidth probe over as many bytes (the plain loops and the "
              "tuned ones, the run's threads and one), each on freshly restored data, "
              "each probe's time the median of as many calls per round as the rows'.",
              "% ceiling and speed-ups are taken in each round (the ceiling's time / the row's; "
              "the row's time / clipcore's, Plan: / the Plan's): their median, (range).",
              "Each family ran in a process of its own, all with the same thread count; in each "
              "round every implementation made its calls in turn."]
    return "\n".join(lines)


def write_chart(results, path):
    """Write a PNG: effective GB/s per case and implementation, the ceiling drawn.

    Bars show the median call, their whiskers the range of the calls. Needs
    matplotlib (raises ImportError without it).
    """
    if "matplotlib" in impls.hidden():
        raise ImportError("matplotlib is hidden by " + impls.HIDE_ENV)
    from matplotlib.figure import Figure

    names = [impl for impl in impls.IMPLS if not impls.IMPLS[impl].self_timed]
    colors = dict(zip(names, ("#1f77b4", "#17becf", "#ff7f0e", "#d62728", "#2ca02c",
                              "#9467bd", "#8c564b", "#e377c2")))
    cases = results["cases"]
    fig = Figure(figsize=(10, 1.0 + 0.9 * len(cases)))
    ax = fig.add_subplot()
    bar_h = 0.8 / len(names)
    for i, case in enumerate(cases):
        y0 = len(cases) - 1 - i
        for j, impl in enumerate(names):
            r = case["results"].get(impl)
            if not r or r["status"] != "ok":
                continue
            y = y0 + 0.4 - (j + 0.5) * bar_h
            gb = case["traffic_bytes"] / 1e9
            ax.barh(y, r["gbps"], height=bar_h, color=colors[impl],
                    xerr=[[r["gbps"] - gb / r["max_s"]], [gb / r["min_s"] - r["gbps"]]],
                    error_kw={"elinewidth": 0.8, "capsize": 1.5},
                    label=impl if impl not in ax.get_legend_handles_labels()[1] else None)
            ax.text(gb / r["min_s"], y, " " + _fmt_time(r["median_s"]), va="center",
                    fontsize=7)
        if case["ceiling"]["status"] == "ok":
            ax.vlines(case["ceiling"]["gbps"], y0 - 0.45, y0 + 0.45, colors="black",
                      linewidth=2, label="bandwidth ceiling" if i == 0 else None)
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), loc="lower right", fontsize=8)
    ax.set_yticks(range(len(cases)), [c["label"] for c in reversed(cases)])
    ax.set_xlabel("effective GB/s (bytes the operation must move / median time; whiskers: "
                  "the range of the calls); bar labels: median time")
    m = results["machine"]
    ax.set_title(f"clipcore {m['clipcore']} on {m['cpu']}, {results['threads']} threads, "
                 f"{m['simd'].split(' (')[0]}", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def check_out_dir(path):
    """Create path if needed and make sure files can be written there; raises OSError."""
    os.makedirs(path, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
        pass


def default_out_dir():
    """The folder a run writes to without --out: bench-results-<date>-<time>."""
    return time.strftime("bench-results-%Y%m%d-%H%M%S")


def failures(results):
    """(case label, row) of every measurement that failed, over all runs."""
    runs = [results] + ([results["one_thread"]] if "one_thread" in results else [])
    return [(case["label"], name) for r_ in runs for case in r_["cases"]
            for name, r in [("ceiling", case["ceiling"]), *case["results"].items()]
            if r["status"] == "error"]


def main(*, cases, threads, repeat, warmup, out, quick, argv, stdout=None, one_thread=True,
         contend=False):
    """Run the bench, print the table, write results.json and chart.png; returns an exit code.

    With one_thread (and threads > 1) everything runs twice, at 1 thread and at
    ``threads``, each against its own ceiling; the JSON is the ``threads`` run's,
    with the 1-thread run under "one_thread". With contend, a busy process
    keeps one core loaded meanwhile.
    """
    stdout = stdout or sys.stdout
    counts = [1, threads] if one_thread and threads > 1 else [threads]
    with Contention(contend):
        runs = [run(cases, threads=t, repeat=repeat, warmup=warmup, argv=argv, quick=quick)
                for t in counts]
    for r in runs:
        r["contend"] = contend
    results = runs[-1]
    if len(runs) > 1:
        results["one_thread"] = runs[0]
    table = "\n\n".join(format_table(r) for r in runs)
    print(table, file=stdout)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(out, "table.txt"), "w") as f:
        f.write(table + "\n")
    print(f"\nresults: {os.path.join(out, 'results.json')}", file=stdout)
    if impls.installed("matplotlib"):
        write_chart(results, os.path.join(out, "chart.png"))
        print(f"chart:   {os.path.join(out, 'chart.png')}", file=stdout)
    else:
        print("chart:   not written: matplotlib is not installed "
              "(pip install matplotlib, or clipcore[bench])", file=stdout)
    errors = failures(results)
    if errors:
        print(f"\n{len(errors)} measurement(s) failed: "
              + "; ".join(f"{impl} on {label}" for label, impl in errors), file=stdout)
        return 1
    return 0
