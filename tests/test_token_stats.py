"""Token-waste statistics: checked against an independent count made with the `tokenizers` library."""
import json
import statistics

import pytest

from bmc_fast.data.token_stats import main, read_texts, shard_waste, waste_stats
from bmc_fast.errors import ConfigError
from helpers import MODERNBERT_TOKENIZER, SHARED_DATA, write_shard

CAPTIONS = SHARED_DATA / "captions" / "biomed_captions.jsonl"
CUTOFFS = [77, 154, 512]


def _need(*paths):
    for path in paths:
        if not path.exists():
            pytest.skip(f"{path} absent; it comes with ../shared/data")


def _direct_lengths(texts, tokenizer_dir=MODERNBERT_TOKENIZER):
    """Token counts straight from the Rust tokenizer: special tokens in, no truncation."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    tokenizer.no_truncation()
    return [len(encoding.ids) for encoding in tokenizer.encode_batch(texts)]


def _assert_matches(stats, lengths):
    total = sum(lengths)
    ordered = sorted(lengths)
    middle = len(ordered) // 2
    median = ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2
    assert stats["n_texts"] == len(lengths)
    assert stats["n_tokens"] == total
    assert stats["mean"] == pytest.approx(total / len(lengths), abs=1e-9)
    assert stats["median"] == median
    assert [row["cutoff"] for row in stats["cutoffs"]] == CUTOFFS
    for row in stats["cutoffs"]:
        cut = row["cutoff"]
        beyond = 0
        truncated = 0
        for n in lengths:
            if n > cut:
                beyond += n - cut
                truncated += 1
        assert row["waste_pct"] == pytest.approx(100 * beyond / total, abs=1e-9)
        assert row["truncated_pct"] == pytest.approx(100 * truncated / len(lengths), abs=1e-9)


def test_biomed_captions_match_a_direct_count(tmp_path):
    _need(CAPTIONS, MODERNBERT_TOKENIZER / "tokenizer.json")
    out_json, out_png = tmp_path / "waste.json", tmp_path / "waste.png"
    stats = main(["--tokenizer", str(MODERNBERT_TOKENIZER), "--data", str(CAPTIONS), "--cutoffs",
                  *map(str, CUTOFFS), "--json", str(out_json), "--plot", str(out_png)])

    with CAPTIONS.open(encoding="utf-8") as lines:
        raw = [json.loads(line)["text"].strip() for line in lines]  # stripped, as the training loader does
    texts = [text for text in raw if text]
    _assert_matches(stats, _direct_lengths(texts))
    assert stats["n_empty"] == len(raw) - len(texts)
    assert json.loads(out_json.read_text()) == stats
    assert stats["tokenizer"] == str(MODERNBERT_TOKENIZER) and stats["data"] == str(CAPTIONS)
    png = out_png.read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000


@pytest.fixture(params=["modernbert", "trained"])
def tokenizer_dir(request, tmp_path):
    """The ModernBERT tokenizer from ../shared/data, and a BPE trained here (runs without the data)."""
    if request.param == "modernbert":
        _need(MODERNBERT_TOKENIZER / "tokenizer.json")
        return MODERNBERT_TOKENIZER
    from bmc_fast.data.text_tokenizer import train_tokenizer

    words = ["chest x-ray axial ct abdomen hepatic lesion adenocarcinoma glandular ultrasound stain"] * 20
    train_tokenizer(words, tmp_path / "trained", vocab_size=300)
    return tmp_path / "trained"


def test_jsonl_matches_a_direct_count_and_plots(tmp_path, tokenizer_dir):
    """The .jsonl path of the CLI without ../shared/data's captions (an empty text, a very long one)."""
    texts = ["Chest X-ray: no acute process.", "   ", "Axial CT, hepatic lesion " * 60, "H&E stain, 40x"]
    data = tmp_path / "captions.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    out_json, out_png = tmp_path / "waste.json", tmp_path / "waste.png"
    stats = main(["--tokenizer", str(tokenizer_dir), "--data", str(data), "--cutoffs", *map(str, CUTOFFS),
                  "--json", str(out_json), "--plot", str(out_png)])
    kept = [t.strip() for t in texts if t.strip()]
    _assert_matches(stats, _direct_lengths(kept, tokenizer_dir))
    assert stats["n_empty"] == 1 and json.loads(out_json.read_text()) == stats
    assert out_png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_webdataset_shard_reads_only_txt_members(tmp_path, tokenizer_dir):
    captions = ["Chest X-ray: no acute cardiopulmonary process.",
                "  Axial CT of the abdomen showing a 3 cm hypodense hepatic lesion.\n",
                "H&E stain, 40x: " + "poorly differentiated adenocarcinoma with glandular structures " * 20,
                "",
                "Ultrasound — café-au-lait naïve résumé µm"]
    members = []
    for i, caption in enumerate(captions):
        members += [(f"sample{i:03d}.jpg", b"\xff\xd8\xff\xe0 not a caption " * 50),
                    (f"sample{i:03d}.txt", caption.encode("utf-8"))]
    write_shard(tmp_path / "shard-000000.tar", [(None, members)])  # whole member names
    pattern = str(tmp_path / "shard-{000000..000000}.tar")

    assert read_texts(pattern) == [caption.strip() for caption in captions]
    stats = main(["--tokenizer", str(tokenizer_dir), "--data", pattern, "--cutoffs", *map(str, CUTOFFS)])
    kept = [caption.strip() for caption in captions if caption.strip()]
    _assert_matches(stats, _direct_lengths(kept, tokenizer_dir))
    assert stats["n_empty"] == 1
    assert stats["cutoffs"][0]["truncated_pct"] > 0  # the long H&E caption is cut at 77

    from bmc_fast.data.text_tokenizer import load_tokenizer

    sample = shard_waste([str(tmp_path / "shard-000000.tar")], load_tokenizer(tokenizer_dir), CUTOFFS,
                         max_texts=2)
    _assert_matches(sample, _direct_lengths(kept[:2], tokenizer_dir))


def test_jsonl_line_without_text_names_the_line(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "fine"}\n{"text": "also fine"}\n{"caption": "wrong field"}\n')
    with pytest.raises(ConfigError, match=r"bad\.jsonl.*line 3.*'text'"):
        read_texts(str(data))
    data.write_text('{"text": "fine"}\nnot json\n')
    with pytest.raises(ConfigError, match=r"line 2"):
        read_texts(str(data))


@pytest.mark.parametrize("cutoffs", [[0], [77, -1], []])
def test_bad_cutoffs_are_rejected(tmp_path, cutoffs):
    with pytest.raises(ConfigError, match="cutoff"):
        waste_stats([10, 20], cutoffs)
    if cutoffs:
        with pytest.raises(ConfigError, match=r"--cutoffs .*integer > 0"):
            main(["--tokenizer", str(tmp_path), "--data", str(tmp_path / "x.jsonl"),
                  "--cutoffs", *map(str, cutoffs)])


def test_missing_data_names_the_flag(tmp_path):
    with pytest.raises(ConfigError, match="--data"):
        read_texts(str(tmp_path / "nothing-{000000..000001}.tar"))
    with pytest.raises(ConfigError, match="--data"):
        read_texts(str(tmp_path / "absent.jsonl"))


@pytest.mark.parametrize("flag", ["--json", "--plot"])
def test_an_output_in_a_missing_directory_is_refused_before_reading(tmp_path, flag):
    with pytest.raises(ConfigError, match=f"^{flag} .*: the directory .*absent' does not exist"):
        main(["--tokenizer", "t", "--data", "d.jsonl", flag, str(tmp_path / "absent" / "out")])
    with pytest.raises(ConfigError, match=f"^{flag} .* is a directory"):
        main(["--tokenizer", "t", "--data", "d.jsonl", flag, str(tmp_path)])
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=f"^{flag} .*: '.*file' is a file, not a directory"):
        main(["--tokenizer", "t", "--data", "d.jsonl", flag, str(tmp_path / "file" / "out")])


def test_waste_stats_by_hand():
    stats = waste_stats([10, 100, 600], [77, 600])
    assert stats["n_texts"] == 3 and stats["n_tokens"] == 710
    assert stats["mean"] == pytest.approx(710 / 3, abs=1e-12) and stats["median"] == 100
    at77, at600 = stats["cutoffs"]
    assert at77["waste_pct"] == pytest.approx(100 * (23 + 523) / 710, abs=1e-12)
    assert at77["truncated_pct"] == pytest.approx(200 / 3, abs=1e-12)
    assert at600["waste_pct"] == 0 and at600["truncated_pct"] == 0  # len == cutoff is not truncated
    assert statistics.median([1, 2, 3, 4]) == waste_stats([1, 2, 3, 4], [1])["median"] == 2.5
