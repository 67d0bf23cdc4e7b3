"""The model: ``config`` (typed presets, ``presets/*.json``), ``clip`` (``BMCLongCLIP``, ``create_model``), the towers
(``vision_tower``, ``text_tower``) and their layer choices (``attn_backend``, ``te_layers``), ``weights`` (tower
checkpoints loaded into a built model, the package's only file reads) through ``state_dict_adapters`` (open_clip,
timm, Hugging Face ModernBERT, Transformer Engine), and ``flops``. Nothing here imports checkpoints, evaluation or
the trainer; building a model reads no files.
"""
