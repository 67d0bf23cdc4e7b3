"""Evaluation of trained models: ``retrieval`` (image-text Recall@k, the CLI), ``zeroshot`` (closed-set
classification by caption templates, the CLI) and ``labelled_images`` (the labelled sets zero-shot reads). Models
come from ``bmc_fast.checkpoint.load``; nothing here writes checkpoints."""
