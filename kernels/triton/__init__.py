"""Triton kernels, one op a file (kernel + launcher). Imported lazily by `mmfast.kernels` for CUDA
tensors only: importing this package needs `triton` (`pip install 'mmfast[gpu]'`)."""
