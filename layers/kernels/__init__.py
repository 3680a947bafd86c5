"""Attention kernels: token-by-token references, chunked pure-JAX paths and Pallas kernels.

Each family has one public entry point in layers/ (`layers.linear_attention`,
`layers.softmax_attention`) that validates its arguments and picks an implementation here through
`layers.kernels.dispatch`.
"""
