"""Block-sparse attention kernels, one plain module each, chosen by `runtime/attention.py`.

`reference` (PyTorch), `triton_portable` (Triton, every GPU and the interpreter), `gluon_hopper`
(Gluon, Hopper) and `flex` (FlexAttention interop) never import each other; what they share lives
in `common`.
"""
