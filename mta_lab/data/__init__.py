"""Data: tokenizers, documents, prepared datasets, and the training mixture."""
