"""Kernels: Triton implementations and their plain-torch references.

Every op here has one reference in ``*_torch.py`` that states its semantics in
plain torch; the Triton version must compute the same function (tests compare
them on fresh random inputs).
"""
