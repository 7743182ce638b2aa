"""Builds onebit's C kernel library (src/onebit/kernels/csrc) as a plain shared object.

Everything else about the package is in pyproject.toml. The library has no Python C-API: it is
loaded with ctypes, so one build serves every Python version. Never -march=native: the SIMD
variants carry per-function target attributes and are picked at runtime (csrc/dispatch.c).
"""

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

CSRC = "src/onebit/kernels/csrc"


class BuildKernels(build_ext):
    def build_extensions(self):
        msvc = self.compiler.compiler_type == "msvc"
        for ext in self.extensions:
            ext.extra_compile_args = (["/O2", "/fp:precise"] if msvc else
                                      ["-O3", "-std=c11", "-ffp-contract=off", "-fno-fast-math"])
        super().build_extensions()


setup(
    ext_modules=[
        Extension(
            "onebit.kernels._onebit_kernels",
            sources=[f"{CSRC}/{f}" for f in ("dispatch.c", "threads.c", "ref.c", "x86.c", "lut.c", "arm.c", "pack.c", "attention.c", "kv.c", "layer.c", "sparse.c")],
            depends=[f"{CSRC}/onebit_kernels.h", f"{CSRC}/internal.h"],
            libraries=[] if __import__("sys").platform == "win32" else ["m", "pthread"],
        )
    ],
    cmdclass={"build_ext": BuildKernels},
)
