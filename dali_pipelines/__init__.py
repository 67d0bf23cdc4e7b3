"""DALI decode and augmentation pipelines, importable as ``bmc_fast.dali_pipelines``.

One graph (``augment.clip_augment``) for ``device="mixed"`` on GPU and ``device_id=None`` on CPU;
``pipeline.build_pipeline`` reads indexed WebDataset shards; ``dali_loader.DaliLoader`` yields the same
batch dicts as the webdataset + PIL loader. The dependency is one-way: these modules use
``bmc_fast.data`` (index, samples, transforms, tokenisation); the data layer imports them only inside the
functions that build a DALI loader or run DALI's decode check. Importing this package imports neither
DALI nor torch.
"""
