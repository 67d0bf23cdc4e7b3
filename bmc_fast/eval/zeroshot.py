"""Zero-shot classification of a bmc-fast run, an export, or any open_clip model, by two protocols.

    python -m bmc_fast.eval.zeroshot --model runs/my-run \\
        --data covid=../shared/data/covid_cxr/shard-{000000..000001}.tar --label-key finding \\
        [--protocol both] [--choices 4] [--seed 0] [--labels labels.json] [--templates t.txt]

- **closed-form multiple choice** (Appendix D of "No Tokens Wasted", the paper's Table 2): each image is
  shown its label and ``--choices`` distractor labels drawn from the dataset's other classes, in an order
  drawn from ``--seed`` (the true label lands in each slot equally often); the answer is the choice whose
  text embedding is most similar to the image's. Accuracy, per-class accuracy, a confusion matrix PNG.
- **all-classes** (CLIP_benchmark's convention): every class's text embedding is the normalised mean of its
  name in each template; top-1 / top-5 accuracy and mean per-class recall.

``--model``: a run directory, an export (``python -m bmc_fast.export``), or ``open_clip:NAME`` /
``open_clip:NAME@PRETRAINED`` (``local-dir:PATH`` names included). Label texts: the label itself, or its
entry in ``--labels`` (a JSON object label -> text); templates: ``--templates``, one per line with
``{}`` (or CLIP_benchmark's ``{c}``) where the text goes (default: the text alone). Results:
``OUT/zeroshot.json`` and ``OUT/zeroshot.md``, several datasets in one call with their average.
"""
from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from bmc_fast.cli import ArgumentParser, check_output_dir, positive_int, read_json_object
from bmc_fast.errors import ConfigError
from bmc_fast.eval.labelled_images import LabelledImages, load_named_sets

_logger = logging.getLogger(__name__)

DEFAULT_TEMPLATES = ("{}",)
CPU = torch.device("cpu")


# ----------------------------------------------------------------------------------------------- protocols

def class_embeddings(encode_texts, class_texts: list[str], templates: tuple[str, ...]) -> torch.Tensor:
    """(C, E): per class, its text in every template, each embedding normalised, averaged, normalised."""
    rows = []
    for text in class_texts:
        features = F.normalize(encode_texts([t.format(text, c=text) for t in templates]), dim=-1)  # (T, E)
        rows.append(F.normalize(features.mean(dim=0), dim=-1))
    return torch.stack(rows)


def all_classes(image_features: torch.Tensor, class_features: torch.Tensor, targets: torch.Tensor) -> dict:
    """Top-1 / top-5 accuracy and mean per-class recall of ``argmax`` over every class (normalised inputs);
    top-5 is None below 5 classes (CLIP_benchmark reports NaN there: it would be 1.0)."""
    logits = image_features @ class_features.T  # (N, C)
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices  # (N, ≤5)
    correct1 = top[:, 0] == targets
    recalls = [correct1[targets == c].double().mean().item() for c in targets.unique()]
    top5 = (top == targets[:, None]).any(1).double().mean().item() if logits.shape[1] >= 5 else None
    return {"top1": correct1.double().mean().item(), "top5": top5, "mean_per_class_recall": float(np.mean(recalls)),
            "n": len(targets)}


def choice_sets(targets: np.ndarray, n_classes: int, k: int, seed: int) -> np.ndarray:
    """(N, k + 1) class indices shown to each image: its class and k distinct others, in a seeded order."""
    rng = np.random.default_rng(seed)
    sets = np.empty((len(targets), k + 1), dtype=np.int64)
    for i, target in enumerate(targets):
        others = np.delete(np.arange(n_classes), target)
        choices = np.concatenate([[target], rng.choice(others, size=k, replace=False)])
        sets[i] = choices[rng.permutation(k + 1)]
    return sets


def multiple_choice(image_features: torch.Tensor, class_features: torch.Tensor, targets: torch.Tensor, k: int,
                    seed: int) -> dict:
    """The closed-form multiple choice: accuracy, per-class accuracy, confusion counts, answer slots."""
    n_classes = class_features.shape[0]
    sets = torch.from_numpy(choice_sets(targets.numpy(), n_classes, k, seed))  # (N, k+1)
    similarity = image_features @ class_features.T  # (N, C)
    picked = sets.gather(1, similarity.gather(1, sets).argmax(dim=1, keepdim=True)).squeeze(1)  # (N,)
    correct = picked == targets
    confusion = torch.zeros(n_classes, n_classes, dtype=torch.int64)
    confusion.index_put_((targets, picked), torch.ones_like(targets), accumulate=True)
    slots = (sets == targets[:, None]).int().argmax(dim=1)  # where the true label was shown
    return {"accuracy": correct.double().mean().item(), "choices": k + 1, "n": len(targets),
            "per_class": {int(c): correct[targets == c].double().mean().item() for c in targets.unique()},
            "confusion": confusion.tolist(), "answer_slots": torch.bincount(slots, minlength=k + 1).tolist()}


# ----------------------------------------------------------------------------------------------- encoders

@dataclass
class Encoder:
    """Normalised image and text embeddings (fp32, on the CPU) of one model, whichever stack it comes from;
    the model runs on ``device`` with images in ``dtype`` (a training engine's module: bf16 on its GPU)."""
    model: Any
    tokenize: Any  # list[str] -> dict of tensors for ``encode``
    transform: Any  # PIL image -> (3, H, W)
    kind: str  # "bmc-fast" or "open_clip"
    device: torch.device = CPU
    dtype: torch.dtype = torch.float32
    rank: int = 0  # with world_size > 1, each rank of a torch.distributed group encodes its share of the images
    world_size: int = 1

    @torch.no_grad()
    def encode_images(self, images: list[bytes], batch_size: int = 32) -> torch.Tensor:
        """(N, E); over several ranks each decodes and encodes its ``my_rows`` of the images, gathered in order."""
        from bmc_fast.data.samples import decode_image
        from bmc_fast.eval.retrieval import gather_rows, my_rows

        mine = [images[i] for i in my_rows(len(images), self.rank, self.world_size).tolist()]
        out = []
        for start in range(0, len(mine), batch_size):
            pixels = torch.stack([self.transform(decode_image(data)) for data in mine[start:start + batch_size]])
            out.append(self.model.encode_image(pixels.to(self.device, self.dtype), normalize=True).float())
        features = torch.cat(out)
        return (gather_rows(features, len(images), self.world_size) if self.world_size > 1 else features).cpu()

    @torch.no_grad()
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenize(texts)
        if self.kind == "open_clip":
            return self.model.encode_text(tokens.to(self.device), normalize=True).float().cpu()
        return self.model.encode_text(tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device),
                                      normalize=True).float().cpu()


def load_encoder(spec: str, flag: str = "--model") -> Encoder:
    """``--model``: a run directory, an export, or ``open_clip:NAME[@PRETRAINED]``."""
    check_model(spec, flag)
    if spec.startswith("open_clip:"):
        import open_clip

        from bmc_fast.checkpoint.open_clip_compat import register_modernbert

        register_modernbert()
        name, _, pretrained = spec[len("open_clip:"):].partition("@")
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained or None)
        return Encoder(model.eval(), open_clip.get_tokenizer(name), preprocess, "open_clip")
    from bmc_fast.checkpoint.load import load_model

    model, tokenizer, transform = load_model(spec)
    return bmc_fast_encoder(model, tokenizer, transform)


def check_model(spec: str, flag: str = "--model") -> None:
    """What can be checked of ``--model`` before anything loads: a directory, or for ``open_clip:NAME[@PRETRAINED]``
    a built-in NAME (or an existing ``local-dir:``) and a PRETRAINED that is a file or one of NAME's tags
    (``hf-hub:`` names are left to open_clip)."""
    if not spec.startswith("open_clip:"):
        if not Path(spec).is_dir():
            raise ConfigError(f"{flag} {spec!r} is not a directory: pass a run directory (bmc_fast/train.py), an "
                              "export (python -m bmc_fast.export) or open_clip:NAME[@PRETRAINED]")
        return
    import open_clip

    name, _, pretrained = spec[len("open_clip:"):].partition("@")
    if name.startswith("local-dir:") and not Path(name[len("local-dir:"):]).is_dir():
        raise ConfigError(f"{flag} {spec!r}: {name[len('local-dir:'):]!r} is not a directory: pass an open_clip "
                          "model directory (python -m bmc_fast.export writes one)")
    if name.startswith(("local-dir:", "hf-hub:")):
        return
    if name not in open_clip.list_models():
        raise ConfigError(f"{flag} {spec!r}: open_clip has no model {name!r}: pass one of open_clip.list_models(), "
                          "e.g. open_clip:ViT-B-32@openai, or open_clip:local-dir:DIR")
    tags = open_clip.list_pretrained_tags_by_model(name)
    if pretrained and not Path(pretrained).is_file() and pretrained not in tags:
        raise ConfigError(f"{flag} {spec!r}: {pretrained!r} is neither a file nor a pretrained tag of {name!r} "
                          f"({', '.join(tags) or 'none'})")


def bmc_fast_encoder(model, tokenizer, transform, device: torch.device = CPU, dtype: torch.dtype = torch.float32,
                     rank: int = 0, world_size: int = 1) -> Encoder:
    """An ``Encoder`` over a ``BMCLongCLIP``; captions padded and truncated to its context; ``rank`` /
    ``world_size``: the images split over a torch.distributed group (``Encoder.encode_images``)."""
    context = model.cfg.context_length

    def tokenize(texts):
        return tokenizer(texts, padding="max_length", max_length=context, truncation=True, return_tensors="pt")

    return Encoder(model, tokenize, transform, "bmc-fast", device, dtype, rank, world_size)


# ----------------------------------------------------------------------------------------------- evaluation

def evaluate(encoder: Encoder, data: LabelledImages, protocol: str = "both", k: int = 4, seed: int = 0,
             label_texts: dict[str, str] | None = None, templates: tuple[str, ...] = DEFAULT_TEMPLATES) -> dict:
    classes = data.classes
    if protocol in ("both", "mc"):
        check_choices(data, k)
    texts = [(label_texts or {}).get(c, c) for c in classes]
    targets = torch.tensor([classes.index(label) for label in data.labels])
    image_features = encoder.encode_images(data.images)
    class_features = class_embeddings(encoder.encode_texts, texts, templates)
    result: dict[str, Any] = {"classes": classes, "n": len(targets)}
    if protocol in ("both", "all"):
        result["all_classes"] = all_classes(image_features, class_features, targets)
    if protocol in ("both", "mc"):
        mc = multiple_choice(image_features, class_features, targets, k, seed)
        mc["per_class"] = {classes[c]: acc for c, acc in mc["per_class"].items()}
        result["multiple_choice"] = mc
    return result


def check_choices(data: LabelledImages, k: int, flag: str = "--choices") -> None:
    """The multiple choice needs ``k`` distractors from the dataset's other classes."""
    n = len(data.classes)
    if k > n - 1:
        raise ConfigError(f"zero-shot dataset {data.name!r}: {flag} {k} distractors, but only {n - 1} other "
                          f"class(es) ({n} in all): pass {flag} {n - 1} or fewer")


def read_labels(path: str, flag: str = "--labels") -> dict[str, str]:
    """The JSON object of ``path``: label -> the text shown to the model in its place."""
    example = '{"covid": "COVID-19 pneumonia", "normal": "no finding"}'
    if not Path(path).is_file():
        raise ConfigError(f"{flag} {path!r} is not a file: pass a JSON file holding an object label -> text, e.g. "
                          f"{example}")
    labels = read_json_object(path, f"{flag} {path!r}", f"write an object label -> text, e.g. {example}")
    for label, text in labels.items():
        if not isinstance(text, str):
            raise ConfigError(f"{flag} {path!r}: the text of label {label!r} is {json.dumps(text)}, not a string: "
                              f"write e.g. {example}")
    return labels


def read_templates(path: str, flag: str = "--templates") -> tuple[str, ...]:
    """One template a line, each with ``{}`` (or CLIP_benchmark's ``{c}``) where the label text goes."""
    if not Path(path).is_file():
        raise ConfigError(f"{flag} {path!r} is not a file: pass a text file with one template a line")
    templates = tuple(line.strip() for line in Path(path).read_text().splitlines() if line.strip())
    if not templates or any("{}" not in t and "{c}" not in t for t in templates):
        raise ConfigError(f"{flag} {path!r}: every line needs a {{}} (or CLIP_benchmark's {{c}}) where the label "
                          "goes")
    return templates


def scalars(results: dict[str, dict]) -> dict[str, float]:
    """Flat metrics for TensorBoard / metrics.jsonl: ``NAME/mc_acc``, ``NAME/top1``, ``NAME/top5`` (5 classes
    or more), ``NAME/mean_per_class_recall``, and their ``average/...`` over datasets that have them."""
    flat: dict[str, float] = {}
    for name, r in results.items():
        mc, ac = r.get("multiple_choice", {}), r.get("all_classes", {})
        values = {"mc_acc": mc.get("accuracy"), "top1": ac.get("top1"), "top5": ac.get("top5"),
                  "mean_per_class_recall": ac.get("mean_per_class_recall")}
        flat.update({f"{name}/{key}": value for key, value in values.items() if value is not None})
    if len(results) > 1:
        for key in ("mc_acc", "top1", "top5", "mean_per_class_recall"):
            values = [flat[f"{name}/{key}"] for name in results if f"{name}/{key}" in flat]
            if len(values) == len(results):
                flat[f"average/{key}"] = float(np.mean(values))
    return flat


def markdown(results: dict[str, dict], average: bool = True) -> str:
    """One row per dataset and (``average``) their average."""
    rows = ["| dataset | n | classes | multiple choice (acc) | all-classes top-1 | top-5 | mean per-class recall |",
            "|---|---|---|---|---|---|---|"]

    def cells(r):
        mc, ac = r.get("multiple_choice", {}), r.get("all_classes", {})
        return [mc.get("accuracy"), ac.get("top1"), ac.get("top5"), ac.get("mean_per_class_recall")]

    def fmt(value):
        return "—" if value is None else f"{100 * value:.1f}"

    for name, r in results.items():
        rows.append(f"| {name} | {r['n']} | {len(r['classes'])} | " + " | ".join(map(fmt, cells(r))) + " |")
    if average and len(results) > 1:
        columns = list(zip(*(cells(r) for r in results.values())))
        mean = [None if None in col else float(np.mean(col)) for col in columns]
        rows.append(f"| **average** ({len(results)}) | | | " + " | ".join(map(fmt, mean)) + " |")
    return "\n".join(rows)


def plot_confusion(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes, confusion = result["classes"], np.array(result["multiple_choice"]["confusion"])
    fig, ax = plt.subplots(figsize=(1 + 0.5 * len(classes), 1 + 0.5 * len(classes)))
    ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=90)
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("answer")
    ax.set_ylabel("true label")
    for (i, j), count in np.ndenumerate(confusion):
        if count:
            ax.text(j, i, str(count), ha="center", va="center", fontsize=7)
    ax.set_title(f"multiple choice, {result['multiple_choice']['choices']} choices")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = ArgumentParser(prog="python -m bmc_fast.eval.zeroshot", description="Zero-shot classification.")
    parser.add_argument("--model", required=True, help="run directory, export, or open_clip:NAME[@PRETRAINED]")
    parser.add_argument("--data", action="append", required=True, metavar="NAME=SOURCE",
                        help="an image-folder tree, a path,label CSV or shards (repeatable)")
    parser.add_argument("--label-key", action="append", default=None,
                        help="shards: the .json field holding the label; once for all --data, or once for each")
    parser.add_argument("--protocol", default="both", choices=("both", "mc", "all"))
    parser.add_argument("--choices", type=positive_int, default=4, help="multiple choice: distractors per image")
    parser.add_argument("--seed", type=int, default=0, help="multiple choice: the draw of distractors and order")
    parser.add_argument("--labels", default=None, help="JSON object: label -> text shown to the model")
    parser.add_argument("--templates", default=None, help="text file, one template with {} a line")
    parser.add_argument("--out", default="zeroshot", help="output directory")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    label_texts = read_labels(args.labels) if args.labels else None
    templates = read_templates(args.templates) if args.templates else DEFAULT_TEMPLATES
    datasets = load_named_sets(args.data, args.label_key)
    for data in datasets:
        if args.protocol != "all":
            check_choices(data, args.choices)
    check_model(args.model)
    out = check_output_dir(args.out, "--out")
    encoder = load_encoder(args.model)
    results = {}
    for data in datasets:
        results[data.name] = evaluate(encoder, data, args.protocol, args.choices, args.seed, label_texts, templates)
        if "multiple_choice" in results[data.name]:
            plot_confusion(results[data.name], out / f"confusion_{data.name}.png")
    table = markdown(results)
    (out / "zeroshot.json").write_text(json.dumps({"model": args.model, "seed": args.seed, **results}, indent=2))
    (out / "zeroshot.md").write_text(table + "\n")
    sys.stdout.write(table + f"\n\nwrote {out / 'zeroshot.json'}\n")
    return results


if __name__ == "__main__":
    from bmc_fast.cli import run_main

    run_main(main)
