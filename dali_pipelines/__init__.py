"""DALI decode and augmentation pipelines, importable as ``bmc_fast.dali_pipelines``.

One graph (``augment.clip_augment``) for ``device="mixed"`` on GPU and ``device_id=None`` on CPU;
``pipeline.build_pipeline`` reads indexed WebDataset shards; ``loader.DaliLoader`` yields the same
batch dicts as the webdataset + PIL loader. DALI itself is imported only when a pipeline is built.
"""
from .loader import DaliLoader, dali_available, index_skips

__all__ = ["DaliLoader", "dali_available", "index_skips"]
