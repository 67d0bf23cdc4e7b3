"""Labelled images for zero-shot classification, from an image-folder tree, a CSV or WebDataset shards.

- a directory: one sub-directory per class, its images inside (``.jpg .jpeg .png .webp``, any depth);
- a ``.csv`` file with a ``path,label`` header (paths relative to the CSV's directory);
- shards (a pattern as ``--train-data`` takes): each sample's image, its label read from the ``.json``
  member under ``label_key`` (``finding`` or ``view`` in ``../shared/data/covid_cxr``; a dotted key walks
  nested fields: ``lesions.0.colour`` in the embedded synthetic data).

Every problem is one ``ConfigError`` naming the dataset: a source that does not exist, a missing label key,
fewer than 2 classes, a folder with no images.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from bmc_fast.data.samples import IMAGE_EXTENSIONS
from bmc_fast.errors import ConfigError


@dataclass(frozen=True)
class LabelledImages:
    name: str
    images: list  # image bytes, one per sample
    labels: list[str]  # one per sample

    @property
    def classes(self) -> list[str]:
        return sorted(set(self.labels))


def load_labelled_images(name: str, source: str, label_key: str | None = None,
                         key_flag: str = "--label-key", flag: str = "--data") -> LabelledImages:
    """The dataset ``name`` from ``source`` (a folder, a CSV or shards); ``flag`` and ``key_flag``: how the
    caller's command line names the source and the label key in its errors."""
    path = Path(source)
    where = f"{flag} (zero-shot dataset {name!r})"
    if _is_missing_path(source):
        raise ConfigError(f"{where} {source!r} does not exist: pass a folder of class sub-folders (ROOT/CLASS/IMAGE), "
                          "a CSV with a 'path,label' header, or shards like 'DIR/shard-{000000..000009}.tar'")
    if path.is_dir():
        images, labels = _from_folder(name, path)
    elif path.suffix == ".csv":
        images, labels = _from_csv(name, path)
    else:
        images, labels = _from_shards(name, source, label_key, key_flag, where)
    data = LabelledImages(name, images, labels)
    if len(data.classes) < 2:
        raise ConfigError(f"zero-shot dataset {name!r}: {len(data.classes)} class(es) {data.classes} in {source!r}; "
                          "classification needs at least 2")
    return data


def load_named_sets(items: tuple[str, ...] | list[str], label_keys: tuple[str, ...] | list[str] | None = None,
                    flag: str = "--data", key_flag: str = "--label-key") -> list[LabelledImages]:
    """Every ``NAME=SOURCE`` of ``items``; ``label_keys``: none, one for all, or one for each, in order."""
    keys = list(label_keys or []) or [None]
    if len(keys) not in (1, len(items)):
        raise ConfigError(f"{key_flag} is given {len(keys)} times for {len(items)} {flag}: give it once (for all) "
                          f"or once for each {flag}, in the same order")
    datasets, names = [], set()
    for item, key in zip(items, keys * len(items) if len(keys) == 1 else keys):
        name, sep, source = item.partition("=")
        if not sep or not name or not source:
            raise ConfigError(f"{flag} {item!r}: write NAME=SOURCE, e.g. covid=DIR/shard-{{000000..000001}}.tar")
        if name in names:
            raise ConfigError(f"{flag}: the name {name!r} is given twice; each dataset needs its own name")
        names.add(name)
        datasets.append(load_labelled_images(name, source, key, key_flag, flag))
    return datasets


def _is_missing_path(source: str) -> bool:
    """Whether ``source`` names one local path (no shard pattern, not remote) that does not exist; a pattern
    that matches nothing is left to ``expand_shards``."""
    from bmc_fast.data.shards import REMOTE_PREFIXES

    pattern = any(ch in source for ch in "{*?[") or "::" in source or source.startswith(REMOTE_PREFIXES)
    return not pattern and not Path(source).exists()


def _from_folder(name: str, root: Path) -> tuple[list, list[str]]:
    images, labels = [], []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        for file in sorted(folder.rglob("*")):
            if file.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS:
                images.append(file.read_bytes())
                labels.append(folder.name)
    if not images:
        raise ConfigError(f"zero-shot dataset {name!r}: the folder {str(root)!r} holds no images (.jpg, .jpeg, .png, "
                          ".webp) in class sub-folders (ROOT/CLASS/IMAGE)")
    return images, labels


def _from_csv(name: str, path: Path) -> tuple[list, list[str]]:
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or not {"path", "label"} <= set(rows[0]):
        raise ConfigError(f"zero-shot dataset {name!r}: {str(path)!r} needs a 'path,label' header and rows")
    missing = [row["path"] for row in rows if not (path.parent / row["path"]).is_file()]
    if missing:
        raise ConfigError(f"zero-shot dataset {name!r}: {len(missing)} image(s) of {str(path)!r} do not exist, e.g. "
                          f"{missing[:3]} (paths are relative to the CSV's folder)")
    return [(path.parent / row["path"]).read_bytes() for row in rows], [row["label"] for row in rows]


def _from_shards(name: str, pattern: str, label_key: str | None, key_flag: str,
                 where: str) -> tuple[list, list[str]]:
    from bmc_fast.data.shards import expand_shards
    from bmc_fast.data.tar_samples import read_tar_samples

    urls = expand_shards(pattern, where)  # shards that are not there are named before a missing label key
    if label_key is None:
        raise ConfigError(f"zero-shot dataset {name!r}: shards need {key_flag}, the .json field holding the label")
    images, labels = [], []
    for url in urls:
        for sample in read_tar_samples(url):
            image = next((sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample), None)
            if image is None:
                continue
            meta = json.loads(sample["json"]) if "json" in sample else {}
            label = _lookup(meta, label_key)
            if label is None:
                raise ConfigError(f"zero-shot dataset {name!r}: sample {sample['__key__']!r} of {url!r} has no "
                                  f"{label_key!r} in its .json (keys: {sorted(meta)}): pass another {key_flag}")
            images.append(image)
            labels.append(str(label))
    return images, labels


def _lookup(meta, key: str):
    """``meta[key]``, where a dotted key walks nested objects and lists (``lesions.0.colour``); None if absent."""
    for part in key.split(".") if key not in meta else [key]:
        if isinstance(meta, dict) and part in meta:
            meta = meta[part]
        elif isinstance(meta, list) and part.isdigit() and int(part) < len(meta):
            meta = meta[int(part)]
        else:
            return None
    return meta
