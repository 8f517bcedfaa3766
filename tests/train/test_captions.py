import numpy as np
import pytest

from lorafuse.train.captions import inject_trigger, process_caption, split_tags

CAPTION = "geralt of rivia, 1boy, sword, looking at viewer, realistic, chainmail, pauldrons, white background"


def test_keep_tokens_shuffle_keeps_the_first_n():
    tags = split_tags(CAPTION)
    orders = set()
    for seed in range(50):
        out = split_tags(process_caption(CAPTION, np.random.default_rng(seed), shuffle=True, keep_tokens=2))
        assert out[:2] == tags[:2]
        assert sorted(out[2:]) == sorted(tags[2:])
        orders.add(tuple(out))
    assert len(orders) > 10  # the rest really is shuffled


def test_keep_tokens_zero_can_move_every_tag():
    firsts = {
        split_tags(process_caption(CAPTION, np.random.default_rng(s), shuffle=True))[0] for s in range(50)
    }
    assert len(firsts) > 3


def test_tag_dropout_never_drops_kept_tokens_and_caption_dropout_empties():
    for seed in range(20):
        out = split_tags(
            process_caption(CAPTION, np.random.default_rng(seed), keep_tokens=1, tag_dropout_rate=0.99)
        )
        assert out[0] == "geralt of rivia" and len(out) < 4
    assert process_caption(CAPTION, np.random.default_rng(0), dropout_rate=1.0) == ""
    assert process_caption(CAPTION, np.random.default_rng(0)) == CAPTION  # nothing on: unchanged spelling


def test_same_rng_seed_same_caption():
    a = process_caption(CAPTION, np.random.default_rng([1, 2, 3]), shuffle=True, tag_dropout_rate=0.3)
    b = process_caption(CAPTION, np.random.default_rng([1, 2, 3]), shuffle=True, tag_dropout_rate=0.3)
    assert a == b


@pytest.mark.parametrize(
    ("caption", "expected"),
    [
        ("1boy, sword", "sks, 1boy, sword"),
        (
            "a photo of a sks dog",
            "a photo of a sks dog",
        ),  # already there as a word: left where the user put it
        ("a photo of a sksx dog", "sks, a photo of a sksx dog"),  # only whole words count
        ("", "sks"),
    ],
)
def test_inject_trigger(caption, expected):
    assert inject_trigger(caption, "sks") == expected
