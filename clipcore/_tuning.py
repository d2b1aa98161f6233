"""Which variant of the streaming loops runs on this machine, and why.

The kernels have run-time choices (``kernels.get_tuning()``): software prefetch
on or off (for the 16-bit loops apart), the direction of the scaling pass, the
hand-written AVX-512 loops, and the size from which ``n_threads=None`` goes
parallel. What is fastest
depends on the CPU (a prefetch distance tuned on one server CPU slows another
by a quarter), so they are chosen here, once per process, at import:

1. ``CLIPCORE_KERNELS`` in the environment forces choices, e.g.
   ``prefetch=0,scale_backward=0,twins=1,prefetch16=1,parallel_min=655360``;
   ``table`` skips the calibration, ``calibrate`` runs it again and rewrites the cache.
2. Otherwise a cached calibration for this CPU model and clipcore version
   (``$XDG_CACHE_HOME/clipcore/tuning.json``, or ``~/.cache/...``).
3. Otherwise a short calibration (well under a second) runs and is cached; a
   calibration that fails, or a cache that cannot be written, leaves the
   table's choices for the CPU's vendor.

Every choice gives the same bits; only speed differs. ``clipcore.show_config()``
prints what runs and where it came from.
"""
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

from clipcore import kernels

# 2: version 1's entries on AMD kept a crossover that a busy machine had left at the table's.
# 3: prefetch16.
CACHE_VERSION = 3
ENV = "CLIPCORE_KERNELS"
KNOBS = ("prefetch", "scale_backward", "twins", "prefetch16", "parallel_min")

# Per vendor, what measurements on this project's machines chose: the Intel
# Xeon VM (Sapphire Rapids) runs fastest with prefetching and the backward
# scaling pass, the AMD EPYC VM (Zen 4) with neither for 32- and 64-bit
# types (its hardware prefetchers do better alone) but with prefetching for
# 16-bit ones (there they fall behind), and there two threads win from
# 512 KiB lists up. Elsewhere the plain loops are the safe guess.
TABLE = {
    "GenuineIntel": {"prefetch": True, "scale_backward": True, "twins": True,
                     "prefetch16": True, "parallel_min": 655360},
    "AuthenticAMD": {"prefetch": False, "scale_backward": False, "twins": True,
                     "prefetch16": True, "parallel_min": 131072},
}
DEFAULT = {"prefetch": False, "scale_backward": False, "twins": True, "prefetch16": False,
           "parallel_min": 655360}

# What this process runs with and why (set by apply()).
chosen = {}
source = ""


def cpu_identity():
    """(vendor, model name) of this CPU, as /proc/cpuinfo or platform says."""
    vendor, model = "", platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key, value = key.strip(), value.strip()
                if key == "vendor_id" and not vendor:
                    vendor = value
                elif key == "model name":
                    model = value
                    break
    except OSError:
        pass
    return vendor, model


def cache_path():
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "clipcore", "tuning.json")


def cache_key():
    from clipcore import __version__
    vendor, model = cpu_identity()
    return f"{__version__}|{vendor}|{model}|{kernels.simd_path()}|{os.cpu_count()}"


def parse_env(text):
    """CLIPCORE_KERNELS's value as a dict of choices; ValueError names what is wrong."""
    out = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in KNOBS:
            raise ValueError(f"{ENV}: expected 'table', 'calibrate' or comma-separated "
                             f"{'/'.join(KNOBS)}=value, got {item!r}")
        try:
            number = int(value)
        except ValueError:
            raise ValueError(f"{ENV}: {key} must be an integer, got {value!r}") from None
        if number < 0 or (key != "parallel_min" and number > 1):
            raise ValueError(f"{ENV}: {key}={number} is out of range")
        out[key] = number if key == "parallel_min" else bool(number)
    return out


def valid(choice):
    """True when choice is a complete, well-typed set of choices."""
    return (isinstance(choice, dict) and set(choice) == set(KNOBS)
            and all(isinstance(choice[k], bool) for k in KNOBS if k != "parallel_min")
            and isinstance(choice["parallel_min"], int)
            and not isinstance(choice["parallel_min"], bool) and choice["parallel_min"] >= 0)


def read_cache():
    """The cached choices for this machine, or None (absent, corrupt, another version)."""
    try:
        with open(cache_path()) as f:
            data = json.load(f)
        if data.get("version") != CACHE_VERSION:
            return None
        choice = data.get("machines", {}).get(cache_key())
    except (OSError, ValueError, AttributeError):
        return None
    return choice if valid(choice) else None


def write_cache(choice):
    """Store choice for this machine (atomically; other machines' entries kept)."""
    path = cache_path()
    try:
        with open(path) as f:
            data = json.load(f)
        if data.get("version") != CACHE_VERSION or not isinstance(data.get("machines"), dict):
            raise ValueError
    except (OSError, ValueError, AttributeError):
        data = {"version": CACHE_VERSION, "machines": {}}
    data["machines"][cache_key()] = choice
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def _median_time(fn, reps):
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def calibrate(budget=0.6):
    """Time the loop variants on this machine; the fastest choices (a dict).

    One thread clips a 40 MB list (beyond most L2s; float16 for prefetch16,
    float32 for the others) with each variant in turn, interleaved, and a
    variant is kept only when it wins by more than 3% in every one of three
    rounds (else the vendor's table stands: a busy machine
    must not overrule it); then the default policy's crossover is the
    smallest list that two threads clip 5% faster than one, on data written
    just before each call (as a training step writes its gradients). Stops
    early, keeping what it has, past ``budget`` seconds.
    """
    from clipcore._lists import Plan
    start = time.perf_counter()
    vendor, _ = cpu_identity()
    choice = dict(TABLE.get(vendor, DEFAULT))
    saved = kernels.get_tuning()
    try:
        for knob, dtype in (("prefetch", np.float32), ("scale_backward", np.float32),
                            ("prefetch16", np.float16)):
            plan = Plan([np.ones((40 << 20) // np.dtype(dtype).itemsize, dtype)], n_threads=1)
            ratios = []                       # time with the knob on / off, per round
            for _ in range(3):
                seconds = {}
                for value in (False, True):
                    kernels.set_tuning(**{**choice, knob: value})
                    norm = plan.global_norm()
                    seconds[value] = _median_time(
                        lambda: plan.clip_by_global_norm_(norm * 0.9999), 3)
                ratios.append(seconds[True] / seconds[False])
            if all(r < 0.97 for r in ratios) or all(r > 1 / 0.97 for r in ratios):
                choice[knob] = ratios[0] < 1     # every round agrees: a real difference
            if time.perf_counter() - start > budget:
                return choice
        kernels.set_tuning(**choice)
        if kernels.openmp_enabled() and kernels.max_threads() > 1:
            choice["parallel_min"] = _crossover(choice["parallel_min"], start + budget)
    finally:
        kernels.set_tuning(**saved)
    return choice


def _crossover(fallback, deadline):
    """The smallest size (elements) from which 2 threads clip 5% faster than 1."""
    from clipcore._lists import Plan
    sizes = [1 << k for k in range(17, 23)]          # 512 kB to 16 MB of float32
    wins = []
    for n in sizes:
        backup = np.ones(n, np.float32)
        data = backup.copy()
        plans = {nt: Plan([data], n_threads=nt) for nt in (1, 2)}
        best = {1: np.inf, 2: np.inf}
        for _ in range(5):
            for nt, plan in plans.items():
                np.copyto(data, backup)
                t0 = time.perf_counter()
                plan.clip_by_global_norm_(0.5)
                best[nt] = min(best[nt], time.perf_counter() - t0)
        wins.append(best[2] < 0.95 * best[1])
        if time.perf_counter() > deadline:
            return fallback
    for i, n in enumerate(sizes):
        if all(wins[i:]):
            return n
    return fallback


def apply():
    """Choose, apply and record this process's tuning (at import)."""
    global chosen, source
    vendor, model = cpu_identity()
    table = dict(TABLE.get(vendor, DEFAULT))
    text = os.environ.get(ENV, "").strip()
    forced = {}
    if text not in ("", "table", "calibrate"):
        try:
            forced = parse_env(text)
        except ValueError as exc:
            print(f"clipcore: {exc}; using the table", file=sys.stderr)
            text = "table"
    if text == "table" or set(forced) == set(KNOBS):
        choice, source = table, f"table ({vendor or 'unknown vendor'})"
    else:
        choice = None if text == "calibrate" else read_cache()
        source = f"cached calibration ({cache_path()})"
        if choice is None:
            try:
                choice = calibrate()
                source = f"calibrated now on {model or vendor or 'this CPU'}"
                try:
                    write_cache(choice)
                except OSError:
                    source += " (not cached: cache not writable)"
            except KeyboardInterrupt:        # nothing cached; the table until the next try
                kernels.set_tuning(**table)
                chosen, source = kernels.get_tuning(), "table (calibration interrupted)"
                raise
            except Exception as exc:         # any failure: the table is safe
                choice = table
                source = f"table ({vendor or 'unknown vendor'}; calibration failed: {exc})"
    if forced:
        choice = {**choice, **forced}
        source = f"{ENV}={text} over {source}"
    kernels.set_tuning(**choice)
    chosen = kernels.get_tuning()
