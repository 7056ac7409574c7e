"""PackedLayout: routing indices, BAGEL's position ids, the visibility rule and the attention plan."""
from __future__ import annotations

import random

import pytest
import torch

from aigid.ops.packing import KINDS, PackedLayout, Split


pytestmark = pytest.mark.usefixtures("one_thread")



def random_samples(rng: random.Random, max_samples: int = 4, max_splits: int = 5, max_len: int = 13):
    """Mixed text/vit/vae splits (some hidden, some of length 1); sometimes a repeated sample."""
    samples = []
    for _ in range(rng.randint(1, max_samples)):
        sample = []
        for _ in range(rng.randint(1, max_splits)):
            kind = rng.choice(KINDS)
            length = 1 if rng.random() < 0.2 else rng.randint(1, max_len)
            sample.append(Split(length, kind, hidden=kind == "vae" and rng.random() < 0.35))
        samples.append(sample)
    if rng.random() < 0.5:
        i = rng.randrange(len(samples))
        samples.insert(i, list(samples[i]))  # identical neighbours: exercised by the grouped plan
    return samples


def brute_force_mask(splits) -> torch.Tensor:
    """The visibility rule written token by token, independently of PackedLayout."""
    owner = [i for i, sp in enumerate(splits) for _ in range(sp.length)]
    n = len(owner)
    mask = torch.zeros(n, n, dtype=torch.bool)
    for qp in range(n):
        for kp in range(n):
            i, j = owner[qp], owner[kp]
            mask[qp, kp] = (j < i and not splits[j].hidden) or (
                j == i and (splits[i].kind != "text" or kp <= qp))
    return mask


DETECTION = [Split(3, "text"), Split(4, "vae"), Split(5, "vit"), Split(2, "text")]
GENERATION = [Split(2, "text"), Split(3, "vae", hidden=True)]


def test_build_offsets_routing_and_positions():
    layout = PackedLayout.build([DETECTION, GENERATION])
    assert layout.total == 14 + 5
    assert layout.cu_seqlens.tolist() == [0, 14, 19]
    assert layout.cu_seqlens.dtype == torch.int32
    assert layout.gen_index.tolist() == [3, 4, 5, 6, 16, 17, 18]
    assert layout.und_index.tolist() == [0, 1, 2, 7, 8, 9, 10, 11, 12, 13, 14, 15]
    assert layout.und_index.dtype == layout.gen_index.dtype == torch.long
    # text counts up, an image split shares one id, the next split continues at id + 1; per sample
    assert layout.position_ids.tolist() == [0, 1, 2, 3, 3, 3, 3, 4, 4, 4, 4, 4, 5, 6,
                                            0, 1, 2, 2, 2]
    assert layout.max_position_id == 6
    assert layout.split_range(0, 2) == (7, 12)
    assert layout.split_range(1, 1) == (16, 19)
    assert layout.sample_range(1) == (14, 19)
    assert layout.token_ranges("text") == [(0, 3), (12, 14), (14, 16)]
    assert layout.token_ranges("vae") == [(3, 7), (16, 19)]
    assert layout.token_ranges("vit") == [(7, 12)]
    assert layout.sample_lengths == [14, 5] and layout.max_seqlen == 14


def test_dense_mask_matches_the_rule_on_random_layouts():
    rng = random.Random(1234)
    for _ in range(40):
        layout = PackedLayout.build(random_samples(rng))
        for b, sample in enumerate(layout.samples):
            assert torch.equal(layout.dense_mask(b), brute_force_mask(sample))


def test_hidden_split_is_invisible_but_reads_earlier_splits():
    layout = PackedLayout.build([[Split(2, "text"), Split(3, "vae", hidden=True), Split(2, "text")]])
    m = layout.dense_mask(0)
    assert not m[5:, 2:5].any()          # the later text never sees the hidden latent
    assert m[2:5, :5].all()              # the hidden split reads the text before it and itself
    assert m[5:, :2].all() and m[5:, 5:].equal(torch.ones(2, 2, dtype=torch.bool).tril())


def test_visible_runs_agree_with_dense_mask():
    rng = random.Random(7)
    for _ in range(30):
        layout = PackedLayout.build(random_samples(rng))
        for b, sample in enumerate(layout.samples):
            base = layout.sample_range(b)[0]
            mask = layout.dense_mask(b)
            for i in range(len(sample)):
                s, e = layout.split_range(b, i)
                runs = layout.visible_runs(b, i)
                assert runs[-1][1] == e
                assert all(r1[1] < r2[0] for r1, r2 in zip(runs, runs[1:]))  # merged, ordered
                covered = torch.zeros(mask.shape[1], dtype=torch.bool)
                for rs, re in runs:
                    covered[rs - base:re - base] = True
                # the last query row of a split sees exactly the runs (all of its own split)
                assert torch.equal(mask[e - 1 - base], covered)


def test_attention_plan_groups_identical_neighbours():
    layout = PackedLayout.build([DETECTION, DETECTION, GENERATION, DETECTION])
    plan = layout.attention_plan()
    assert [(g.offset, g.count, g.length) for g in plan] == [(0, 2, 14), (28, 1, 5), (33, 1, 14)]
    assert plan[1].splits[1].runs == ((0, 5),)
    assert [sp.causal for sp in plan[0].splits] == [True, False, False, True]
    assert layout.attention_plan() is plan  # cached


def test_to_moves_tensors_and_keeps_structure():
    layout = PackedLayout.build([DETECTION], device="cpu").to("meta")
    assert layout.position_ids.is_meta and layout.und_index.is_meta
    assert layout.total == 14 and layout.split_range(0, 3) == (12, 14)


@pytest.mark.parametrize("bad, error", [
    ([], ValueError),
    ([[]], ValueError),
    ([Split(2, "text")], ValueError),
    ([[("text", 2)]], TypeError),
])
def test_build_rejects_bad_samples(bad, error):
    with pytest.raises(error):
        PackedLayout.build(bad)


@pytest.mark.parametrize("kwargs", [dict(length=0, kind="text"), dict(length=2, kind="audio"),
                                    dict(length=2.0, kind="vit"), dict(length=True, kind="vit")])
def test_split_validates(kwargs):
    with pytest.raises(ValueError):
        Split(**kwargs)


def test_range_queries_check_bounds():
    layout = PackedLayout.build([GENERATION])
    with pytest.raises(IndexError):
        layout.split_range(0, 2)
    with pytest.raises(IndexError):
        layout.dense_mask(1)
    with pytest.raises(ValueError):
        layout.token_ranges("image")


def test_rerouting_keeps_structure_and_validates():
    layout = PackedLayout.build([DETECTION])
    markers_out = layout.with_gen_index(torch.tensor([5, 4]))   # latents 4, 5 only
    assert markers_out.gen_index.tolist() == [4, 5]
    assert markers_out.und_index.tolist() == [0, 1, 2, 3, 6, *range(7, 14)]
    assert torch.equal(markers_out.position_ids, layout.position_ids)
    with pytest.raises(ValueError, match="repeated"):
        layout.with_gen_index(torch.tensor([4, 4]))
    with pytest.raises(ValueError, match=r"\[0, 14\)"):
        layout.with_gen_index(torch.tensor([4, 14]))
    with pytest.raises(ValueError, match="partition"):
        PackedLayout(layout.samples, layout.total, layout.cu_seqlens, layout.und_index[:-1],
                     layout.gen_index, layout.position_ids)
