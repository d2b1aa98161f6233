"""CI: the sdist can build a wheel, and the repaired wheel is complete.

python .ci/check_dists.py SDIST WHEEL
"""
import sys
import tarfile
import zipfile

sdist, wheel = sys.argv[1:3]
in_sdist = {name.split("/", 1)[-1] for name in tarfile.open(sdist).getnames()}
need = ["LICENSE", "MANIFEST.in", "setup.py", "pyproject.toml", "clipcore/kernels.pxd",
        "clipcore/tf_ops.cc",
        "src/clipcore/kernels.pyx", "src/clipcore/_lists.pxd", "src/clipcore/_loops.pxd",
        "src/clipcore/cc_platform.h", "src/clipcore/cc_half.h", "src/clipcore/cc_reduce.h",
        "src/clipcore/cc_scale.h", "src/clipcore/cc_elementwise.h", "src/clipcore/cc_axis.h",
        "src/clipcore/cc_probe.h", "tests/conftest.py"]
missing = [n for n in need if n not in in_sdist]
assert not missing, f"{sdist}: missing {missing}"
generated = sorted(n for n in in_sdist if n.startswith("src/") and n.endswith(".c"))
assert not generated, f"{sdist}: Cython output {generated}"

in_wheel = set(zipfile.ZipFile(wheel).namelist())
assert any(n.startswith("clipcore.libs/libgomp") for n in in_wheel), f"{wheel}: libgomp not vendored"
need = ["clipcore/kernels.pxd", "clipcore/tf_ops.cc", "clipcore/_version.py", "clipcore/py.typed"]
missing = [n for n in need if n not in in_wheel]
assert not missing, f"{wheel}: missing {missing}"
assert any(n.endswith("licenses/LICENSE") for n in in_wheel), f"{wheel}: no LICENSE"
print(f"sdist and wheel complete: {sdist.rsplit('/', 1)[-1]}, {wheel.rsplit('/', 1)[-1]}")
