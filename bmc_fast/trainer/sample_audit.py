"""``--audit-samples``: every rank writes the samples of each step to ``audit/rank<r>.jsonl`` in the run directory.

One line a step: ``{"step": 7, "keys": ["<shard>#<key>", ...], "epochs": [0, ...]}``, the rows of all the step's
micro batches in order; ``epochs`` (the PIL loader's) is the epoch each row was read in. A resumed run first drops
the lines of steps after its checkpoint (a killed run may have written them), so the files hold exactly the samples
the weights were trained on, whatever the stops, resumes and resizes: anyone can check that an epoch used every
sample once (tests/test_resize.py does).
"""
from __future__ import annotations

import json
from pathlib import Path


class SampleAudit:
    """This rank's audit file: ``add`` each batch, ``write`` once a step."""

    def __init__(self, directory: Path, rank: int):
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / f"rank{rank:05d}.jsonl"
        self.keys: list[str] = []
        self.epochs: list[int] = []

    def add(self, batch: dict) -> None:
        self.keys += batch["keys"]
        self.epochs += batch.get("epochs", [])

    def write(self, step: int) -> None:
        line = {"step": step, "keys": self.keys, **({"epochs": self.epochs} if self.epochs else {})}
        with open(self.path, "a") as sink:
            sink.write(json.dumps(line) + "\n")
        self.keys, self.epochs = [], []


def drop_steps_after(directory: Path, last_step: int) -> None:
    """Remove from every rank's audit file the lines of steps after ``last_step`` (rank 0, before any rank writes)."""
    for path in sorted(directory.glob("rank*.jsonl")):
        lines = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= last_step]
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in lines))
        tmp.replace(path)


def read_audit(directory: Path) -> dict[int, dict[int, dict]]:
    """{rank: {step: line}} of a run's audit files."""
    return {int(path.stem[4:]): {line["step"]: line for line in map(json.loads, path.read_text().splitlines())}
            for path in sorted(Path(directory).glob("rank*.jsonl"))}
