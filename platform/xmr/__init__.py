"""xmr: train, tune and serve cross-modal retrieval models with multi-negative contrastive learning."""

__version__ = "0.1.0"
