"""tokenloom.kernels: pure-torch reference kernels (the CPU path) and Triton kernels."""
