"""What a run reads, assembled from the rooms below: its tokenizer, corpora and tasks (``data``,
``tasks``), and the training stream that mixes them by weight."""
