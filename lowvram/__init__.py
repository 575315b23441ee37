"""lowvram: Live Avatar on consumer GPUs."""
__version__ = "0.1.0"
