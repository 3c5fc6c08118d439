"""cpp / cuda backends of attention: nothing registered (yet), so fastbert's torch implementation runs.

On CPU that implementation is PyTorch's fused flash kernel (``_scaled_dot_product_flash_attention_for_cpu``):
blocked GEMM micro-kernels with an online softmax, in fp32 for every dtype. A hand-written kernel in csrc/cpu would
have to beat that GEMM code before fusion could pay off, so the cpp backend leaves attention to it; the masked
softmax that the ``output_attentions=True`` path needs is compiled (fastbert/ops/softmax/native.py). The CUDA
kernels (csrc/cuda) get registered here once they are bound to torch.
"""
