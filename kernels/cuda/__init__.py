"""CUDA kernels: `.cu` sources (package data), the cached RawModule loader, and the device runtime.

Two runtimes launch the same kernels: `CupyRuntime` on a real GPU and `EmulatedRuntime`, which
compiles the `.cu` files with the host C++ compiler against `emu/cuda_emu.h` and runs them on the
CPU (see `runtime.py`). `import cupy` happens only inside this package, lazily.
"""
