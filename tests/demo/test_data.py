"""The demo world (`mmfast.demo.data`): splits, reproducibility and `every`, the trainers' pool."""
import pytest
import torch

from mmfast.demo import data


def _rows(s: data.Scenes) -> list[tuple]:
    cols = torch.stack([s.colour, s.shape, s.position, s.size, s.background, s.offset[:, 0], s.offset[:, 1]], 1)
    return [tuple(r) for r in cols.tolist()]


def _keys(s: data.Scenes) -> set[tuple]:
    return set(_rows(s))


def test_sample_is_reproducible_and_respects_the_split():
    a, b = data.sample(64, seed=7), data.sample(64, seed=7)
    assert torch.equal(a.images, b.images) and torch.equal(a.label, b.label)
    triples = lambda s: set(zip(s.colour.tolist(), s.shape.tolist(), s.position.tolist()))  # noqa: E731
    assert not triples(data.sample(512, seed=1)) & data.HELDOUT
    assert triples(data.sample(512, seed=1, split="heldout")) <= data.HELDOUT


@pytest.mark.parametrize("split, n", [("train", 9600), ("heldout", 2400), ("all", 12000)])
def test_every_lists_each_distinct_scene_once(split, n):
    e = data.every(split)
    assert len(e) == n and len(_keys(e)) == n
    assert e.images.shape == (n, data.SIZE, data.SIZE, 3) and e.images.dtype == torch.uint8


def test_every_row_is_the_scene_sample_draws():
    pictures = dict(zip(_rows(data.every("train")), data.every("train").images))
    s = data.sample(200, seed=3)
    for key, img in zip(_rows(s), s.images):
        assert torch.equal(pictures[key], img)


def test_bad_split_names_the_choices():
    with pytest.raises(ValueError, match="split must be"):
        data.every("test")
