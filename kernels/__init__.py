"""Triton kernels of canet, installed as ``canet.kernels``.

Every module here may import triton at module level; nothing outside this package imports it
eagerly, so ``import canet`` works without triton installed.
"""
