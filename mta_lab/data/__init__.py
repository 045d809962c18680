"""Data: tokenizers, documents and prepared datasets (the training mixture is `mta_lab.assembly`)."""
