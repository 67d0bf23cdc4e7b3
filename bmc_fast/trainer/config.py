"""``TrainConfig``: every training flag once, with its type, default, help and legal values.

``bmc_fast/train.py`` derives its command line from these fields (``bmc_fast.cli.add_config_arguments``);
``__post_init__`` validates a config however it was built, naming the flag.
"""
from __future__ import annotations

from dataclasses import dataclass

from bmc_fast.cli import check_choice, option
from bmc_fast.data.select_loader import LOADERS
from bmc_fast.errors import ConfigError
from bmc_fast.kernels import BACKENDS as LOSS_BACKENDS
from bmc_fast.model.config import ATTN_BACKENDS, IMAGE_PROJECTIONS, TE_PRECISIONS
from bmc_fast.trainer.grad_norm import GRAD_NORM_DTYPES
from bmc_fast.trainer.metrics import REPORTERS

# With gradient_accumulation_steps K > 1: one loss over all K micro batches (GradCache), or K losses.
ACCUMULATIONS = ("contrastive", "independent")
# --resume (latest): continue from checkpoints/latest; --resume auto: that when it exists, else a new run.
RESUME_MODES = ("latest", "auto")
# The contrastive objective: CLIP's softmax (InfoNCE) or SigLIP's sigmoid, both fused (bmc_fast.kernels).
LOSSES = ("clip", "siglip")
# The training recipe beyond the JSON: a resumed run keeps the values it started with (trainer/resume.py).
RECIPE_FLAGS = ("loss", "lock_image", "lock_image_unlocked_groups", "lock_text", "lock_text_unlocked_layers",
                "lr_image_scale", "lr_text_scale", "layer_decay")


@dataclass
class TrainConfig:
    ds_config: str = option("ds_configs/zero2.json", "DeepSpeed JSON: batch size, optimizer, LR schedule, precision, "
                            "ZeRO stage", flags=("--ds_config", "--ds-config"))
    preset: str = option("tiny", "model preset name (bmc_fast/model/presets) or JSON path")
    train_data: str | None = option(None, "WebDataset shards; omit (with --eval-data) for the embedded synthetic data")
    train_data_weights: str | None = option(None, "with --train-data 'A::B': each source's upsampling factor, '1::3' "
                                            "(open_clip's --train-data-upsampling-factors; docs/data.md)")
    eval_data: str | None = option(None, "WebDataset shards for retrieval evaluation (>= 2 pairs)")
    tokenizer: str | None = option(None, "Hugging Face tokenizer directory or Hub id ORG/NAME[@REVISION] (required "
                                   "with --train-data)")
    context_length: int | None = option(None, "text tokens kept per caption (77, 154, 512); default: the preset's")
    max_steps: int | None = option(None, "optimizer steps; default: the DeepSpeed scheduler's total_num_steps")
    eval_every: int = option(100, "steps between evaluations (retrieval, zero-shot), and always at the end (0: only "
                             "at the end)")
    zeroshot_data: tuple[str, ...] = option((), "NAME=SOURCE: labelled images (an image-folder tree, a path,label "
                                            "CSV, or shards with --zeroshot-label-key) classified zero-shot at each "
                                            "evaluation, both protocols (python -m bmc_fast.eval.zeroshot)")
    zeroshot_label_key: tuple[str, ...] = option((), "shards: the .json field naming the label; once for every "
                                                 "--zeroshot-data or once for each, in order")
    zeroshot_choices: int = option(4, "zero-shot multiple choice: distractor labels shown with each image's own")
    zeroshot_templates: str | None = option(None, "zero-shot: text file, one prompt template a line with {} where "
                                            "the label goes; default: the label alone")
    save_every: int = option(500, "steps between DeepSpeed checkpoints, and always at the end (0: only at the end)")
    log_every: int = option(10, "steps between metric lines")
    report_to: str = option("tensorboard", "where metrics go besides metrics.jsonl: tensorboard, wandb, both "
                            "('tensorboard,wandb') or none (W&B: pip install wandb; WANDB_MODE=offline needs no "
                            "account)")
    wandb_project: str = option("bmc-fast", "with --report-to wandb: the W&B project (WANDB_ENTITY picks the entity)")
    keep_checkpoints: int = option(0, "keep the newest N checkpoints, delete older ones (0: keep all)")
    output_dir: str | None = option(None, "run directory; default runs/<preset>-ctx<context>-seed<seed>")
    overwrite: bool = option(False, "replace an existing run directory")
    resume: str | None = option(None, "continue the run in --output-dir from checkpoints/latest; 'auto': resume when "
                                "a checkpoint exists, else start a new run (for schedulers that requeue a command)",
                                choices=RESUME_MODES, const="latest")
    seed: int = option(0, "model init and data order; also picks the embedded dataset")
    workers: int = option(1, "data loader processes (pil) or DALI threads (dali, dali-stream) per rank")
    loader: str = option("auto", "image decode + augmentation: DALI (GPU mixed / CPU) or webdataset + PIL; "
                         "auto: dali when installed; dali-stream: DALI decodes the PIL loader's stream (what dali "
                         "becomes with remote shards)", choices=LOADERS)
    loss_backend: str = option("auto", "fused contrastive loss kernels (auto: Triton on CUDA, torch on CPU)",
                               choices=LOSS_BACKENDS)
    image_weights: str | None = option(None, "open_clip (visual.*) or timm ViT checkpoint file for the image tower, or "
                                       "its Hub id (hf-hub:ORG/NAME, timm/NAME; @REVISION pins one)")
    text_weights: str | None = option(None, "Hugging Face ModernBERT directory (config.json + safetensors) or Hub id "
                                      "ORG/NAME[@REVISION]")
    pretrained: str | None = option(None, "initialise the whole model (towers, projections, logit scale and bias) "
                                    "from a bmc-fast export or run directory, its Hub id (hf-hub:ORG/NAME), or an "
                                    "open_clip checkpoint of the same architecture; the optimizer starts fresh and the "
                                    "run evaluates at step 0 (docs/training.md)")
    loss: str = option("clip", "contrastive loss: clip (softmax, InfoNCE) or siglip (sigmoid, with a learnable bias: "
                       "logit scale starts at log 10, bias at -10)", choices=LOSSES)
    lock_image: bool = option(False, "freeze the image tower, projection included (open_clip's --lock-image)")
    lock_image_unlocked_groups: int = option(0, "with --lock-image: leave the last N of open_clip's lock groups "
                                             "trainable (1: the projection alone; 2: also the last block and ln_post)")
    lock_text: bool = option(False, "freeze the text tower, projection included")
    lock_text_unlocked_layers: int = option(0, "with --lock-text: leave the last N groups trainable (1: the "
                                            "projection alone, 2: also the final norm, 3: also the last layer ...)")
    lr_image_scale: float = option(1.0, "the image tower's learning rate: the schedule's × this")
    lr_text_scale: float = option(1.0, "the text tower's learning rate: the schedule's × this")
    layer_decay: float = option(1.0, "layer-wise learning-rate decay (EVA-CLIP): each tower's layer i of L trains at "
                                "lr × decay^(L + 1 - i), its head at lr; 1: off")
    drop_path: float | None = option(None, "image tower stochastic depth at the last block (ramped from 0 over the "
                                     "blocks, as timm); default: the preset's (the paper presets: 0.1)")
    image_proj: str | None = option(None, "with --image-weights: keep the checkpoint's image projection or start a "
                                    "fresh linear one; default: the preset's", choices=IMAGE_PROJECTIONS)
    attn_backend: str | None = option(None, "attention kernels; default: the preset's", choices=ATTN_BACKENDS)
    te_precision: str | None = option(None, "Transformer Engine layers (CUDA); default: the preset's",
                                      choices=TE_PRECISIONS)
    text_unpad: bool | None = option(None, "pad captions instead of packing their real tokens",
                                     negate="--no-text-unpad")
    max_bad_steps: int = option(10, "stop the run (exit 1) after this many skipped steps in a row: steps whose loss "
                                "or gradient norm is not finite on some rank are skipped by all")
    grad_checkpointing: bool = option(False, "activation checkpointing in both towers")
    grad_norm_dtype: str = option("auto", "dtype of DeepSpeed's gradient norm for clipping: float64 (DeepSpeed's), "
                                  "float32; auto: float32 on CPU, where float64 copies of every gradient cost "
                                  "seconds a step (bmc_fast/trainer/grad_norm.py)", choices=GRAD_NORM_DTYPES)
    accumulation: str = option("contrastive", "with gradient_accumulation_steps K > 1: 'contrastive' contrasts all K "
                               "micro batches in one loss (one extra forward each), 'independent' is DeepSpeed's "
                               "plain accumulation (K losses of micro batch x ranks pairs)", choices=ACCUMULATIONS)
    deterministic: bool = option(False, "torch's deterministic settings (torch.use_deterministic_algorithms, "
                                 "CUBLAS_WORKSPACE_CONFIG): a rerun of the same seed repeats the run bit for bit")
    audit_samples: bool = option(False, "write the samples of every step to audit/rank<r>.jsonl in the run directory, "
                                 "one line a step (check that stops, resumes and resizes used each sample of an "
                                 "epoch once: docs/cluster.md)")
    skip_memory_check: bool = option(False, "on CUDA, launch without the memory preflight (bmc_fast.plan): the "
                                     "planner's estimate is computed, not measured; pass this to launch anyway")

    @property
    def lr_scales(self):
        """``--lr-image-scale``, ``--lr-text-scale``, ``--layer-decay`` as ``param_groups.LrScales``."""
        from bmc_fast.trainer.param_groups import LrScales

        return LrScales(self.lr_image_scale, self.lr_text_scale, self.layer_decay)

    @property
    def reporters(self) -> tuple[str, ...]:
        """``--report-to`` as a tuple: ``('tensorboard', 'wandb')``; ``()`` for none."""
        return () if self.report_to == "none" else tuple(part.strip() for part in self.report_to.split(","))

    def __post_init__(self) -> None:
        self.zeroshot_data = tuple(self.zeroshot_data or ())  # argparse gives None or a list
        self.zeroshot_label_key = tuple(self.zeroshot_label_key or ())
        for name in ("zeroshot_label_key", "zeroshot_templates"):
            if getattr(self, name) and not self.zeroshot_data:
                raise ConfigError(f"--{name.replace('_', '-')} was given without --zeroshot-data NAME=SOURCE")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"--max-steps must be >= 1, got {self.max_steps}")
        if self.context_length is not None and self.context_length < 3:  # as ModelConfig requires
            raise ConfigError(f"--context-length must be >= 3 ([CLS], [SEP] and at least one text token), got "
                              f"{self.context_length}; e.g. 77, 154 or 512")
        for name in ("eval_every", "save_every", "workers", "keep_checkpoints"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        for name in ("log_every", "max_bad_steps", "zeroshot_choices"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name, allowed in (("loader", LOADERS), ("loss_backend", LOSS_BACKENDS), ("image_proj", IMAGE_PROJECTIONS),
                              ("attn_backend", ATTN_BACKENDS), ("te_precision", TE_PRECISIONS),
                              ("accumulation", ACCUMULATIONS), ("resume", RESUME_MODES), ("loss", LOSSES),
                              ("grad_norm_dtype", GRAD_NORM_DTYPES)):
            check_choice(self, name, allowed)
        unknown = [part for part in self.reporters if part not in REPORTERS]
        if unknown or not self.report_to:
            raise ConfigError(f"--report-to {self.report_to!r}: each of its comma-separated parts must be one of "
                              f"{REPORTERS} (or 'none' alone)")
        for name, lock in (("lock_image_unlocked_groups", "lock_image"), ("lock_text_unlocked_layers", "lock_text")):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
            if getattr(self, name) and not getattr(self, lock):
                raise ConfigError(f"--{name.replace('_', '-')} {getattr(self, name)} was given without "
                                  f"--{lock.replace('_', '-')}: pass both (the count leaves groups of a locked tower "
                                  "trainable)")
        for name in ("lr_image_scale", "lr_text_scale"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}: to freeze a "
                                  f"tower pass --lock-{name.split('_')[1]}")
        if not 0 < self.layer_decay <= 1:
            raise ConfigError(f"--layer-decay must be in (0, 1], got {self.layer_decay}: EVA-CLIP fine-tunes with "
                              "0.65-0.9; 1 turns it off")
        if self.drop_path is not None and not 0 <= self.drop_path < 1:
            raise ConfigError(f"--drop-path must be in [0, 1), got {self.drop_path}: the paper's is 0.1")
        if self.pretrained is not None and (self.image_weights or self.text_weights):
            raise ConfigError("--pretrained initialises both towers: drop --image-weights / --text-weights, or drop "
                              "--pretrained to start from tower checkpoints")
        if self.resume and self.overwrite:
            raise ConfigError("--resume and --overwrite contradict each other: pass one")
        if self.train_data is None and self.eval_data is not None:
            raise ConfigError("--eval-data was given without --train-data: pass both, or neither for the "
                              "embedded synthetic data")
        if self.train_data_weights is not None and self.train_data is None:
            raise ConfigError("--train-data-weights was given without --train-data 'A::B' (its sources, joined by "
                              "'::')")
        if self.train_data is not None and self.tokenizer is None:
            raise ConfigError("--train-data needs --tokenizer DIR (a Hugging Face tokenizer directory, e.g. "
                              "../shared/data/tokenizers/modernbert)")
