"""The trainer (open_clip's ``open_clip_train``): everything a DeepSpeed run needs beyond the library.

``config`` (``TrainConfig``: every flag, typed and validated), ``prepare`` (checks every input before a
model exists), ``loop`` (``run``: the training loop, as named steps), ``resume`` (what a resumed run may
change), ``ds_config`` (batch arithmetic from the DeepSpeed JSON), ``distributed`` (ranks, devices),
``run_data`` (loaders and data statistics of a run), ``metrics`` (logging, JSONL, TensorBoard, throughput)
and ``demo``. The library (``bmc_fast`` outside this package) never imports it.
"""
