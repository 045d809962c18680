"""The fused MTA path: a Triton band-FlashAttention kernel (band_flash) and the exact moves of every MTA
stage into its operands (mta). torch and triton only; the model library calls it."""
