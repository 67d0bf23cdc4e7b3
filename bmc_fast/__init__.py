"""bmc-fast: long-context biomedical CLIP training."""
