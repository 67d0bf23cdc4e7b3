import pytest
import torch

from bmc_fast.eval.retrieval import retrieval_recall


def brute_force_recall(image, text, ks):
    """Loop over queries; a hit at k when fewer than k other candidates score >= the true pair."""
    image = image / image.norm(dim=1, keepdim=True)
    text = text / text.norm(dim=1, keepdim=True)
    sim = (text.double() @ image.double().T).tolist()
    n = len(sim)
    out = {}
    for name, score in (("t2i", lambda q, c: sim[q][c]), ("i2t", lambda q, c: sim[c][q])):
        for k in ks:
            hits = 0
            for q in range(n):
                better = sum(1 for c in range(n) if c != q and score(q, c) >= score(q, q))
                hits += better < k
            out[f"{name}_r{k}"] = 100.0 * hits / n
    return out


@pytest.mark.parametrize("n,d", [(1, 4), (7, 3), (150, 16)])
def test_matches_brute_force(n, d):
    image, text = torch.randn(n, d), torch.randn(n, d)
    text[: n // 2] = image[: n // 2] + 0.3 * torch.randn(n // 2, d)  # half the pairs are near matches
    ks = (1, 5, 10, 100)
    got = retrieval_recall(image, text, ks)
    want = brute_force_recall(image, text, ks)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key]), key


def test_perfect_and_directional():
    image = torch.eye(6)
    text = torch.eye(6)
    assert all(v == 100.0 for v in retrieval_recall(image, text, (1, 5)).values())
    # Text 1 is a copy of text 0, so it points at image 0.
    text = torch.eye(6)
    text[1] = image[0]
    r = retrieval_recall(image, text, (1, 2))
    assert r["t2i_r1"] == pytest.approx(100 * 5 / 6)  # text 1 scores 0 on image 1 and on 4 others, 1 on image 0
    assert r["t2i_r2"] == pytest.approx(100 * 5 / 6)  # ... and those ties count against it at every k < 6
    assert r["i2t_r1"] == pytest.approx(100 * 4 / 6)  # image 0: text 1 ties text 0; image 1: all texts score 0
    assert r["i2t_r2"] == pytest.approx(100 * 5 / 6)  # image 0 is a hit at k=2, image 1 still ties 5 others


def test_ties_count_against_the_query():
    collapsed = torch.ones(10, 4)
    r = retrieval_recall(collapsed, collapsed, (1, 5, 9, 10))
    assert r["t2i_r1"] == 0.0 and r["i2t_r5"] == 0.0 and r["t2i_r9"] == 0.0
    assert r["t2i_r10"] == 100.0  # 9 others tie: fewer than 10 -> a hit


def test_fewer_candidates_than_k_is_a_hit():
    image, text = torch.randn(3, 5), torch.randn(3, 5)
    r = retrieval_recall(image, text, (100,))
    assert r == {"t2i_r100": 100.0, "i2t_r100": 100.0}


def test_default_keys():
    r = retrieval_recall(torch.randn(4, 2), torch.randn(4, 2))
    assert list(r) == ["t2i_r1", "t2i_r5", "t2i_r10", "t2i_r100", "i2t_r1", "i2t_r5", "i2t_r10", "i2t_r100"]


@pytest.mark.parametrize("image,text", [(torch.randn(3, 4), torch.randn(4, 4)), (torch.randn(3), torch.randn(3)),
                                        (torch.randn(0, 4), torch.randn(0, 4))])
def test_bad_shapes(image, text):
    with pytest.raises(ValueError):
        retrieval_recall(image, text)
