"""Compute kernels: `kernels.cpu` (Numba) and `kernels.cuda` (CUDA sources and CuPy loaders).

Imports nothing from `engine` or `app`.
"""
