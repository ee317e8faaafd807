"""IPython magics for sandboxed kernels (``%container``): they arrive with snapshots."""
