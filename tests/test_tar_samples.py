"""The one tar reader groups members into samples as webdataset 1.0 does (webdataset itself is the reference)."""
import webdataset as wds
from webdataset.tariterators import base_plus_ext

from bmc_fast.data.shards import count_samples
from bmc_fast.data.tar_samples import member_key, read_tar_samples, wds_tar_samples
from helpers import write_shard

NAMES = ["a.jpg", "a.JPG", "k.tar.gz", "dir/k.seg.json", "figs.v1/k.txt", "figs.v1/README", "README", "._a.jpg",
         "dir/._a.jpg", "__meta__", "__key__.txt", "dir/__x__/y.txt", ".hidden", "a.", "x/y/z.Png"]


def _webdataset_skips(name):
    """What webdataset's tar_file_iterator and group_by_keys pass over (webdataset 1.0.2's own rules)."""
    import re

    meta = "/" not in name and name.startswith("__") and name.endswith("__")
    return meta or re.match(r"__[^/]*__($|/)", name) is not None or base_plus_ext(name)[0] is None


def test_member_key_is_webdatasets_base_plus_ext_lower_cased():
    for name in NAMES:
        want = None if _webdataset_skips(name) else (base_plus_ext(name)[0], base_plus_ext(name)[1].lower())
        assert member_key(name) == want, name


def _plain(samples):
    return [{k: v for k, v in s.items() if k not in ("__members__", "__url__")} for s in samples]


def test_local_and_streamed_reading_equal_webdatasets_grouping(tmp_path):
    samples = [("a", {"jpg": b"1", "txt": b"one"}), ("b", {"PNG": b"2", "txt": b"two", "json": b"{}"}),
               (None, [("._b.png", b"apple"), ("notes", b"no extension")]), ("c.v1", {"seg.txt": b"three"}),
               ("dir/d", {"jpg": b"4"})]
    shard = write_shard(tmp_path / "clean.tar", samples)
    theirs = _plain({k: v for k, v in s.items() if k != "__local_path__"}
                    for s in wds.DataPipeline(wds.SimpleShardList([shard]), wds.tarfile_to_samples()))
    assert _plain(read_tar_samples(shard)) == theirs
    assert _plain(wds_tar_samples([{"url": shard}])) == theirs
    assert count_samples(shard) == len(theirs) == 4


def test_a_repeated_member_marks_one_sample_and_the_stream_goes_on(tmp_path):
    shard = write_shard(tmp_path / "dup.tar", [("a", [("jpg", b"1"), ("jpg", b"1"), ("txt", b"x")]),
                                               ("b", {"jpg": b"2", "txt": b"y"})])
    local = list(read_tar_samples(shard))
    assert [s["__key__"] for s in local] == ["a", "b"] and local[0]["__duplicate__"] and "__duplicate__" not in local[1]
    assert [m["fname"] for m in local[0]["__members__"]] == ["a.jpg", "a.jpg", "a.txt"]  # the repeat is listed
    assert _plain(local) == _plain(wds_tar_samples([{"url": shard}]))


def test_local_members_carry_the_data_offsets_dali_indexes(tmp_path):
    shard = write_shard(tmp_path / "off.tar", [("a", {"jpg": b"12345", "txt": b"caption"})])
    raw = open(shard, "rb").read()
    for member in next(read_tar_samples(shard))["__members__"]:
        assert raw[member["offset"]:member["offset"] + member["size"]] == member["data"]
    headers_only = next(read_tar_samples(shard, read=False))
    assert headers_only["jpg"] is None and [m["size"] for m in headers_only["__members__"]] == [5, 7]
