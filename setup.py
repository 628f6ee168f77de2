# The native quantizer is a plain C extension built with the system compiler.
# -ffp-contract=off: ggml's reference quantizers are built without FMA on x86-64;
# contracting a*b+c would change rounding and break bit-exactness.
from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "gguforge.quantize._native",
            sources=["gguforge/quantize/_native.c", "gguforge/quantize/native_misc.c", "gguforge/quantize/native_iq3.c"],
            depends=["gguforge/quantize/native_iq2.c", "gguforge/quantize/native_iq2_grids.h",
                     "gguforge/quantize/native_prims.h", "gguforge/quantize/native_ext.h",
                     "gguforge/quantize/native_iq3_tables.h"],
            extra_compile_args=["-O3", "-std=c11", "-ffp-contract=off", "-fno-fast-math", "-Wno-psabi"],
        )
    ]
)
