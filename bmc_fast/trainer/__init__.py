"""The trainer (open_clip's ``open_clip_train``): everything a DeepSpeed run needs beyond the library.

Before a model exists: ``config`` (``TrainConfig``: every flag, typed and validated), ``prepare`` (checks every
input), ``ds_config`` (what the trainer checks and changes in the DeepSpeed JSON), ``resume`` (what a resumed run
may change), ``distributed`` (ranks, devices). The run: ``loop`` (``run``: start, then named steps; ``StepHooks``
for code that watches them), ``param_groups``, ``contrastive_accumulation``, ``grad_norm``, ``nan_guard``,
``checkpointing`` with ``rank_state`` (each rank's stream and RNG in a checkpoint), ``run_data`` (loaders, the
training stream, skipped samples), ``run_record`` (config.json, summary.json), ``metrics`` (logging, JSONL,
TensorBoard, throughput), ``step_profile`` (where a step's time goes); and ``demo``. The library (``bmc_fast``
outside this package) never imports it.
"""
