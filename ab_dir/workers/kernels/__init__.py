"""Triton kernels (GPU; also run on CPU under TRITON_INTERPRET=1 for tests).

Import the kernels from ``workers.kernels.triton_attention``; this package itself does not import
triton, so machines without triton can still import ``workers.kernels``.
"""
