"""jaxlm: Transformer language models in JAX/Flax, from data to deployment."""

__version__ = "0.1.0"
