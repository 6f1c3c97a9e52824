"""Native (C++) CPU kernels called through XLA's FFI; each is optional and checked.

`cpu_gemv`: the matrix-vector product of CPU decode steps (`runtime.products` calls it).
"""
