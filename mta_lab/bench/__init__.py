"""Benchmarks (`mta-lab bench`): training throughput and memory per preset (``train``), the attention
layer per execution path (``attention``), and each Triton kernel's launch settings (``kernels``). They
print numbers; they decide nothing at run time."""
