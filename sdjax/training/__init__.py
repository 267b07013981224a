"""Training internals; the public API is :mod:`sdjax.train`."""
