"""Triton kernels, one module per family, installed as ``lowbit.triton_kernels``.

Importing a module here imports Triton, so ``lowbit.ops`` imports them on first use only. Set
``TRITON_INTERPRET=1`` before that first use to run them on CPU tensors in Triton's interpreter.
"""
