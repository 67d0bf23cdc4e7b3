"""Fused contrastive-loss kernels, importable as ``bmc_fast.kernels``.

This package depends on torch and triton only, so it can be dropped into any CLIP codebase. The fused
similarity + symmetric cross-entropy kernels land here (issue 3); until then the trainer uses the
plain-torch loss in ``bmc_fast.loss``.
"""
