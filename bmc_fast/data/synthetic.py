"""Embedded default data: procedurally drawn "lesion" images with long figure-style captions.

    python -m bmc_fast.data.synthetic --out DIR --seed 0

writes WebDataset shards ``DIR/train/shard-XXXXXX.tar`` and ``DIR/eval/shard-XXXXXX.tar``, each sample
``{key}.png`` (RGB), ``{key}.txt`` (caption) and ``{key}.json`` (the drawn attributes), plus
``DIR/manifest.json``.

The task measures context length, as the BMC-LongCLIP ablation does. Every caption opens like a real
figure caption: a preamble of ~100-150 tokens (study, cohort, acquisition, processing, scale,
ethics) that is shared in kind by many samples and says nothing that tells one image from another
except its modality, which sets the background. Only *after* it come the findings: 1-3 lesions,
each with a colour, a size and a position on a 3×3 grid. A 77-token text tower sees the preamble
and no finding; a 512-token tower sees everything.
"""
from __future__ import annotations

import io
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from bmc_fast.cli import ArgumentParser, check_output_dir, positive_int, run_main
from bmc_fast.errors import ConfigError

_logger = logging.getLogger(__name__)

VERSION = 1  # bump when the generated data changes, so caches regenerate
IMAGE_SIZE = 80  # pixels; training crops and resizes (tiny preset: 64)
SAMPLES_PER_SHARD = 1000

COLOURS = {
    "red": (220, 30, 30), "green": (30, 190, 40), "blue": (40, 60, 230), "yellow": (240, 220, 30),
    "purple": (140, 40, 190), "cyan": (30, 210, 220), "orange": (245, 130, 20), "white": (250, 250, 250),
}
ROWS = ("upper", "middle", "lower")
COLUMNS = ("left", "central", "right")
SIZES = {"small": 0.07, "large": 0.13}  # lesion radius as a fraction of the image side


def position_name(row: int, col: int) -> str:
    if (row, col) == (1, 1):
        return "centre"
    return f"{ROWS[row]} {COLUMNS[col]}"


@dataclass(frozen=True)
class Modality:
    name: str
    figure_noun: str  # "photomicrograph", "axial CT image", ...
    lesion_nouns: tuple[str, ...]
    background: tuple[int, int, int]  # mean RGB
    noise: float  # background texture strength (0-255 scale)
    acquisition: tuple[str, ...]  # sentence templates
    processing: tuple[str, ...]
    display: tuple[str, ...]


# The four imaging modalities: figure nouns, lesion nouns, background and caption templates (data, not code).
MODALITIES = tuple(Modality(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
                   for fields in json.loads((Path(__file__).with_name("synthetic_modalities.json")).read_text()))

STUDY = (
    "Figure {fig}. Representative {figure_noun} from the {cohort_adj} cohort of a {design} study of {condition}.",
    "Figure {fig}. {figure_noun_cap} obtained in a {design} study investigating {condition} at {n_sites} centres.",
)
COHORT = (
    "Samples were obtained from {n} patients ({women} women; median age {age} years, range {lo} to {hi}) "
    "enrolled between {y1} and {y2} at a tertiary referral hospital.",
    "The cohort comprised {n} consecutive patients with a median age of {age} years, of whom {women} were "
    "women, recruited from {y1} to {y2} across {n_sites} participating sites.",
)
CONDITIONS = ("chronic inflammatory disease", "early stage malignancy", "infectious complications",
              "treatment response", "metabolic disorders", "autoimmune conditions")
DESIGNS = ("retrospective", "prospective", "multicentre", "single centre observational")
COHORT_ADJ = ("discovery", "validation", "training", "external test")
VENDORS = ("Leica", "Zeiss", "Olympus", "Siemens", "Philips", "Canon", "Nikon", "Hamamatsu")
DEPARTMENTS = ("pathology", "dermatology", "research", "clinical laboratory")
COUNT_WORDS = {1: "one lesion is", 2: "two lesions are", 3: "three lesions are"}


def _fill(template: str, rng: random.Random, **fixed: str) -> str:
    n = rng.randint(40, 900)
    values = dict(
        fig=rng.randint(1, 9), pct=rng.choice((2, 4, 10)), hours=rng.randint(6, 72), um=rng.choice((3, 4, 5)),
        mag=rng.choice((10, 20, 40, 63)), vendor=rng.choice(VENDORS), bar=rng.choice((20, 50, 100, 200)),
        density=rng.choice((5000, 10000, 20000)), minutes=rng.choice((10, 15, 30, 60)),
        slices=rng.choice((64, 128, 256)),
        kv=rng.choice((100, 120)), mm=rng.choice((1, 2, 3, 5)), ml=rng.choice((80, 100, 120)),
        seconds=rng.choice((60, 70, 80)), years=rng.randint(3, 12), years2=rng.randint(13, 30),
        level=rng.choice((40, 50, 60)), width=rng.choice((350, 400, 450)), n_readers=rng.choice(("two", "three")),
        dept=rng.choice(DEPARTMENTS), n=n, women=rng.randint(10, n), age=rng.randint(35, 70),
        lo=rng.randint(18, 30), hi=rng.randint(75, 92), y1=rng.randint(2005, 2014), y2=rng.randint(2015, 2023),
        n_sites=rng.randint(2, 12), condition=rng.choice(CONDITIONS), design=rng.choice(DESIGNS),
        cohort_adj=rng.choice(COHORT_ADJ),
    )
    values.update(fixed)
    return template.format(**values)


def make_preamble(modality: Modality, rng: random.Random) -> str:
    """The shared part of the caption: informative about the modality only."""
    noun = modality.figure_noun
    sentences = [
        _fill(rng.choice(STUDY), rng, figure_noun=noun, figure_noun_cap=noun[0].upper() + noun[1:]),
        _fill(rng.choice(COHORT), rng),
        _fill(rng.choice(modality.acquisition), rng),
        _fill(rng.choice(modality.processing), rng),
        _fill(rng.choice(modality.display), rng),
    ]
    return " ".join(sentences)


def make_findings(modality: Modality, lesions: list[dict], rng: random.Random) -> str:
    parts = [f"Findings: {COUNT_WORDS[len(lesions)]} identified."]
    for lesion in lesions:
        noun = rng.choice(modality.lesion_nouns)
        where = "in the centre" if lesion["position"] == "centre" else f"in the {lesion['position']} region"
        parts.append(f"A {lesion['size']} {lesion['colour']} {noun} is seen {where}.")
    return " ".join(parts)


def draw_image(modality: Modality, lesions: list[dict], rng: random.Random, size: int = IMAGE_SIZE) -> Image.Image:
    nprng = np.random.default_rng(rng.getrandbits(32))
    base = np.array(modality.background, dtype=np.float32) + nprng.normal(0, 6, 3)  # per-image tint
    pixels = base + nprng.normal(0, modality.noise, (size, size, 1)) + nprng.normal(0, 3, (size, size, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    cell = size / 3
    for lesion in lesions:
        row, col = lesion["row"], lesion["col"]
        cx = (col + 0.5) * cell + rng.uniform(-0.15, 0.15) * cell
        cy = (row + 0.5) * cell + rng.uniform(-0.15, 0.15) * cell
        r = SIZES[lesion["size"]] * size * rng.uniform(0.85, 1.15)
        aspect = rng.uniform(0.7, 1.3)
        colour = tuple(int(np.clip(c + rng.randint(-20, 20), 0, 255)) for c in COLOURS[lesion["colour"]])
        draw.ellipse((cx - r * aspect, cy - r / aspect, cx + r * aspect, cy + r / aspect), fill=colour)
    return image


def make_sample(rng: random.Random) -> tuple[Image.Image, str, dict]:
    modality = rng.choice(MODALITIES)
    cells = rng.sample([(r, c) for r in range(3) for c in range(3)], k=rng.choice((1, 2, 3)))
    lesions = [
        {"row": r, "col": c, "position": position_name(r, c), "colour": rng.choice(list(COLOURS)),
         "size": rng.choice(list(SIZES))}
        for r, c in cells
    ]
    preamble = make_preamble(modality, rng)
    caption = preamble + " " + make_findings(modality, lesions, rng)
    meta = {"modality": modality.name, "lesions": lesions, "findings_start_char": len(preamble) + 1}
    return draw_image(modality, lesions, rng), caption, meta


def write_split(out_dir: Path, n_samples: int, seed: int, prefix: str,
                samples_per_shard: int = SAMPLES_PER_SHARD) -> list[str]:
    """Write ``n_samples`` into shards of ``samples_per_shard``; returns the shard paths."""
    import webdataset as wds

    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    shards = []
    for shard_index, start in enumerate(range(0, n_samples, samples_per_shard)):
        path = out_dir / f"shard-{shard_index:06d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for i in range(start, min(start + samples_per_shard, n_samples)):
                image, caption, meta = make_sample(rng)
                png = io.BytesIO()
                image.save(png, format="PNG")
                sink.write({"__key__": f"{prefix}{i:07d}", "png": png.getvalue(), "txt": caption,
                            "json": json.dumps(meta).encode()})
        shards.append(str(path))
    return shards


def generate(out: str | Path, seed: int = 0, n_train: int = 10_000, n_eval: int = 200,
             samples_per_shard: int = SAMPLES_PER_SHARD) -> dict:
    """Write the train and eval splits under ``out``; returns the manifest (also saved as manifest.json)."""
    if n_train < 1 or n_eval < 2 or samples_per_shard < 1:
        raise ValueError(f"need n_train >= 1, n_eval >= 2 and samples_per_shard >= 1, got {n_train}, {n_eval} "
                         f"and {samples_per_shard}")
    out = Path(out)
    train = write_split(out / "train", n_train, seed=2 * seed, prefix="train", samples_per_shard=samples_per_shard)
    evals = write_split(out / "eval", n_eval, seed=2 * seed + 1, prefix="eval", samples_per_shard=samples_per_shard)
    manifest = {
        "version": VERSION, "seed": seed, "n_train": n_train, "n_eval": n_eval,
        "train": brace_pattern(out / "train", len(train)), "eval": brace_pattern(out / "eval", len(evals)),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    _logger.info("wrote %d train and %d eval samples to %s", n_train, n_eval, out)
    return manifest


def brace_pattern(directory: Path, n_shards: int) -> str:
    """``dir/shard-{000000..000009}.tar``, the WebDataset way of naming a shard range."""
    last = n_shards - 1
    return str(directory / (f"shard-{{000000..{last:06d}}}.tar" if last else "shard-000000.tar"))


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-samples", type=positive_int, default=10_000)
    parser.add_argument("--eval-samples", type=positive_int, default=200, help="at least 2 (retrieval)")
    parser.add_argument("--samples-per-shard", type=positive_int, default=SAMPLES_PER_SHARD)
    args = parser.parse_args(argv)
    if args.eval_samples < 2:
        raise ConfigError(f"--eval-samples must be >= 2 (retrieval needs two pairs), got {args.eval_samples}")
    check_output_dir(args.out, "--out")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    manifest = generate(args.out, args.seed, args.train_samples, args.eval_samples, args.samples_per_shard)
    _logger.info("train: %s\neval:  %s", manifest["train"], manifest["eval"])


if __name__ == "__main__":
    run_main(main)
