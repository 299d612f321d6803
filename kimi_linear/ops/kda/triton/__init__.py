"""Triton kernels for Kimi Delta Attention (one concern per module).

* ``utils``: element-wise helpers shared by the kernels (gate activations, constants).
* ``recurrent``: the decode kernel (token loop, state pool, per-token states).
* ``chunk_fwd``: the chunked forward (chunk-local preparation + sequential recurrence with the output fused).
* ``chunk_bwd``: the backward (reverse recurrence kernel + chunk-local gradients).

Importing this package needs triton; kernels run on CUDA devices or under ``TRITON_INTERPRET=1``.
"""
