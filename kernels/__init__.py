"""Triton kernels, one module per op (installed as gapfix.kernels).

Importing this package does not import Triton; each kernel module does, and is
imported only when an op runs its Triton path.
"""
