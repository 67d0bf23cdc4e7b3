"""Evaluation of trained models: ``retrieval`` (image-text Recall@k, the CLI) and ``checkpoint``
(a model, its tokenizer and config from a run directory's DeepSpeed checkpoint)."""
