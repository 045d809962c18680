"""Pretrained checkpoints in and out: Hugging Face Llama-layout directories to mta-lab weights and
presets (``mta-lab import``), mta-lab runs back to Hugging Face directories (``mta-lab export``), and
the weights file a run starts from (``train.init_from``). Local files only: nothing is downloaded."""
