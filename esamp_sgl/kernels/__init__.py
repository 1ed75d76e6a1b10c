"""Triton kernels for the hot path. Importing this package never launches anything; the CPU
path does not call into it (set TRITON_INTERPRET=1 before import to run kernels on CPU tensors)."""
