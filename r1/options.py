"""The choices a user makes by name, each list defined once: model dtypes, devices, weight
quantization and the KV cache's dtype. The CLI, the bench scripts, the configs and the memory
calculator import them from here; torch-free, so the CLI's parser builds without loading torch.
"""

DTYPES = ("fp32", "bf16", "fp16")  # a model's compute dtype; "auto" picks one per device
DEVICES = ("cpu", "cuda")  # "auto" picks cuda when there is one
QUANT_MODES = ("none", "int8", "int4", "int4-pure")  # weight-only, of the linears (r1/quant.py)
KV_CACHE_DTYPES = ("auto", "bf16", "int8")  # auto: the model's dtype
# r1/kernels' CPU builds, widest first, after auto (the widest that runs) and off (PyTorch's paths).
CPU_KERNELS = ("auto", "off", "avx512_amx", "avx512_vnni", "avx2")
