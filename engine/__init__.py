"""Everything that is not GUI: GGUF files, architectures, planning, running. No Qt."""
import os

# OpenBLAS threads spin after every NumPy matmul and starve the Numba kernels that follow (a
# decode step slows ~5x once attention over a long context goes through BLAS). Our own kernels
# own the cores; BLAS keeps one thread. Must run before NumPy is first imported.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
