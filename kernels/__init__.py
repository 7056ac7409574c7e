"""Triton kernels for aigid (importable as ``aigid.kernels``).

This package knows nothing about models. Each kernel file holds the Triton kernels and one
``torch.autograd.Function``; ``reference.py`` holds the plain-PyTorch twin of every kernel,
the ground truth the tests compare against. Triton is imported lazily by the kernel modules,
so importing ``aigid.kernels.reference`` never needs Triton.
"""
