"""Native (C++) CPU kernels called through XLA's FFI; each is optional and checked.

All are built into one library with one worker pool (`build`, spin_pool.h).
`cpu_gemv`: the float32 matrix-vector product of CPU decode steps (`runtime.products`).
`quant_matmul`: products with GGUF-encoded weights (F16, BF16, Q8_0, Q4_0, Q4_K, Q5_K,
Q6_K), int8 dot products on AVX-512 VNNI or AVX2 as llama.cpp does.
"""
