"""Triton kernels for MTA: the fused path's band-FlashAttention kernel (band_flash) with the exact moves
of every MTA stage into its operands (mta), and the tiled path's score-map convolution (score_conv).
torch and triton only; the model library calls them."""
