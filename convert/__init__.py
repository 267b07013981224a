"""PyTorch checkpoint layouts -> sdjax params pytrees (installed as ``sdjax.convert``).

Knows PyTorch key names and tensor layouts; knows nothing about sampling.
"""
