"""Trained models on disk: ``run_dir`` (a run directory's layout), ``zero_weights`` (fp32 weights of a DeepSpeed
ZeRO checkpoint, read without unpickling code), ``load`` (``load_model``, ``load_run``: reading only), ``export``
(an open_clip directory), ``open_clip_compat`` (ModernBERT in open_clip) and ``universal`` (DeepSpeed's universal
checkpoints, for a resume on another number of ranks); ``export`` and ``universal`` are the modules that write.
Evaluation imports the loading side; nothing here imports evaluation or the trainer.
"""
