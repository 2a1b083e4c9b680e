"""Build the optional C kernels (klayer._kernels); everything else is in pyproject.toml.

The extension is optional: without a C compiler the install still succeeds and klayer
runs its NumPy code, which is the reference the kernels are tested against.
"""

import sys

from setuptools import Extension, setup

# -ffp-contract=off: no fused multiply-adds, so float32 arithmetic rounds as NumPy's does;
# -fno-trapping-math lets comparisons vectorize (results are unchanged)
flags = [] if sys.platform == "win32" else ["-O3", "-ffp-contract=off", "-fno-trapping-math"]

setup(
    ext_modules=[
        Extension("klayer.core._kernels",
                  [f"src/klayer/core/{f}.c" for f in ("_kernels", "_gemm", "_pool")],
                  depends=[f"src/klayer/core/{f}.h" for f in ("_gemm", "_gemm_isa", "_pool")],
                  extra_compile_args=flags,
                  extra_link_args=[] if sys.platform == "win32" else ["-pthread"],
                  optional=True),
    ]
)
