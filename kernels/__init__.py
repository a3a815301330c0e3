"""Triton kernels for stdit; each file holds its kernels, launcher, autograd Function and functional API."""
