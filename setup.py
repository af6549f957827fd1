from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "blockrep._native",
            sources=["native/native.c"],
            extra_compile_args=["-O3", "-std=gnu11", "-Wall"],
        )
    ]
)
