"""kimi-linear: Kimi Linear (Kimi Delta Attention + MLA hybrid) in readable PyTorch with fast kernels.

Layout, bottom to top (no module imports from a layer above it):
    ops/      operators (KDA): one stable function each, PyTorch reference beside the kernels
    layers/   one layer per file (KDA, MLA, MoE, MLP, norms), built on ops
    models/   configs, the Kimi Linear model and checkpoint I/O, built from layers
    engine/   generation and serving concerns, built on models
    cli.py    the command line, thin on top
"""

__version__ = "0.1.0"
