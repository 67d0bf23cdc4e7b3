"""The text tower's two sequence layouts: every real token lands once, at its caption's position, padding pools
nowhere, and a row multiple (FP8) is met, checked against the (B, L) batch they were built from."""
from __future__ import annotations

import pytest
import torch

from bmc_fast.model.caption_layout import GroupedCaptions, PackedCaptions
from bmc_fast.model.text_tower import masked_mean

PAD = 0


def _batch(lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) ids, none of them the pad id (only ``mask`` says what is real), and the mask."""
    g = torch.Generator().manual_seed(len(lengths))
    ids = torch.randint(1, 1000, (len(lengths), max(lengths) + 3), generator=g)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return ids, mask


@pytest.mark.parametrize("layout_class", [PackedCaptions, GroupedCaptions])
@pytest.mark.parametrize("multiple", [1, 16])
@pytest.mark.parametrize("lengths", [[5, 1, 9, 9, 3, 8], [1], [64, 60, 2]])
def test_layout_places_each_caption_and_pools_its_mean(layout_class, multiple, lengths):
    ids, mask = _batch(lengths)
    layout = layout_class(lengths, torch.device("cpu"), multiple)
    assert layout.real == sum(lengths) and layout.total % multiple == 0 and layout.total >= layout.real
    tokens = layout.tokens(ids[mask.bool()], PAD)
    assert tokens.shape == (layout.total,)
    assert int((tokens == PAD).sum()) == layout.total - layout.real  # every real token placed once
    for i, n in enumerate(lengths):
        at = (layout.caption_of == i).nonzero()[:, 0]
        assert torch.equal(tokens[at], ids[i, :n])  # in order
        assert torch.equal(layout.positions[at], torch.arange(n))  # RoPE restarts per caption
    # a feature of (token, position), pooled, against masked_mean over the (B, L) batch
    table = torch.randn(1000, 4, dtype=torch.float64)
    hidden = table[tokens] + layout.positions[:, None]  # (T', 4)
    want = masked_mean(table[ids] + torch.arange(ids.shape[1])[None, :, None], mask)
    torch.testing.assert_close(layout.pool(hidden, mask.sum(1)), want, rtol=1e-12, atol=1e-12)


def test_grouped_layout_groups_are_views_of_whole_rows():
    lengths = [30, 31, 29, 3, 2, 1, 17]
    layout = GroupedCaptions(lengths, torch.device("cpu"), multiple=16)
    assert [g.start for g in layout.groups] == [0, *[g.stop for g in layout.groups[:-1]]]  # back to back
    assert layout.groups[-1].stop == layout.total
    for group in layout.groups:
        rows = layout.caption_of[group.start:group.stop].view(group.size, group.longest)
        for row in rows:  # one caption (or padding) per row, its tokens first
            caption = int(row[0])
            real = int((row == caption).sum()) if caption < len(lengths) else 0
            assert real == (lengths[caption] if caption < len(lengths) else 0)
            assert torch.equal(row[real:], torch.full((group.longest - real,), len(lengths)))
    assert layout.total - layout.real < 0.25 * layout.real + 16  # the grouping's slack, and the row multiple
