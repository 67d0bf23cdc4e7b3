"""DALI decode and augmentation pipelines, importable as ``bmc_fast.dali_pipelines``.

Planned (issue 5): one augmentation graph for ``device="mixed"`` on GPU and ``device_id=None`` on CPU.
Until then the trainer reads shards with the webdataset + PIL loader in ``bmc_fast.data.loader``.
"""
