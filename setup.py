"""Build hook for the optional C extensions; all metadata lives in pyproject.toml.

Every extension is optional: where no C compiler is available the build goes on without them,
the index runs its numpy paths (`kvcache.index.memory.KERNELS_AVAILABLE` tells which one is in
use), the event decoder its msgspec paths (`kvcache.events.decode.FAST_PATH_AVAILABLE`), vLLM
block keys their hashlib paths (`kvcache.hashing.vllm.KERNEL_AVAILABLE`) and the HTTP service
its msgspec token parsing (`kvcache.service.http.FAST_TOKENS_AVAILABLE`).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "kvcache.index._kernels",
            ["src/kvcache/index/_kernels.c"],
            extra_compile_args=["-O3", "-std=c11"],
            optional=True,
        ),
        Extension(
            "kvcache.hashing._chain",
            ["src/kvcache/hashing/_chain.c"],
            extra_compile_args=["-O3", "-std=c11"],
            optional=True,
        ),
        Extension(
            "kvcache.service._token_json",
            ["src/kvcache/service/_token_json.c"],
            extra_compile_args=["-O3", "-std=c11"],
            optional=True,
        ),
        Extension(
            "kvcache.events._fastdecode",
            ["src/kvcache/events/_fastdecode.c"],
            extra_compile_args=["-O3", "-std=c11"],
            optional=True,
        ),
    ]
)
