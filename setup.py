"""Build hook for the optional C kernels; all metadata lives in pyproject.toml.

The extension is optional: where no C compiler is available the build goes on without it and
the index runs its numpy paths (`kvcache.index.kernels.AVAILABLE` tells which one is in use).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "kvcache.index._kernels",
            ["src/kvcache/index/_kernels.c"],
            extra_compile_args=["-O3", "-std=c11"],
            optional=True,
        )
    ]
)
