import numpy as np
import pytest

from lorafuse.errors import UserInputError
from lorafuse.world.catalog import (
    CLASS_NAMES,
    HELD_OUT_STYLES,
    SEEN_STYLES,
    STYLE_NAMES,
    all_individuals,
    caption,
    individual,
    parse_individual,
    vocabulary,
)
from lorafuse.world.render import Pose, render


def test_world_size_meets_the_brief():
    assert len(CLASS_NAMES) >= 12
    assert len(SEEN_STYLES) >= 10
    assert set(HELD_OUT_STYLES).isdisjoint(SEEN_STYLES)
    held = all_individuals(held_out=True)
    assert len(held) == 2 * len(CLASS_NAMES)
    assert all(x.held_out for x in held) and not any(x.held_out for x in all_individuals(held_out=False))


@pytest.mark.parametrize("style", STYLE_NAMES)
def test_every_style_renders_deterministically(style):
    ind = individual("teapot", 3)
    a = render(ind, style, 7)
    b = render(ind, style, 7)
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert a.std() > 5, "a style that renders a blank image"


@pytest.mark.parametrize("cls", CLASS_NAMES)
def test_individuals_of_a_class_differ_in_shape(cls):
    """Identity must survive colour-dropping styles: same pose, ink style, different individuals differ."""
    pose = Pose()
    imgs = [render(individual(cls, i), "ink", 0, pose=pose).astype(float) for i in range(10)]
    for i in range(10):
        for j in range(i + 1, 10):
            assert np.abs(imgs[i] - imgs[j]).mean() > 1.0, f"{cls}_{i:02d} and {cls}_{j:02d} look the same in ink"


def test_styles_keep_geometry():
    """Two styles of the same individual and pose cover the same object silhouette (edges line up)."""
    ind, pose = individual("car", 2), Pose()
    flat = render(ind, "flat", 0, pose=pose).astype(float)
    bg_only = render(individual("car", 2), "flat", 0, pose=Pose(scale=0.01)).astype(float)
    obj = np.abs(flat - bg_only).sum(-1) > 30
    for style in ("outlined", "pastel", "neon"):
        other = render(ind, style, 0, pose=pose).astype(float)
        other_bg = render(ind, style, 0, pose=Pose(scale=0.01)).astype(float)
        other_obj = np.abs(other - other_bg).sum(-1) > 30
        overlap = (obj & other_obj).sum() / max(obj.sum(), 1)
        assert overlap > 0.6, f"{style} moved the object (overlap {overlap:.2f})"


def test_pose_changes_the_image():
    ind = individual("fish", 1)
    assert np.abs(render(ind, "flat", 1).astype(int) - render(ind, "flat", 2).astype(int)).mean() > 1


def test_captions_and_names():
    ind = parse_individual("teapot_08")
    assert ind.held_out and ind.cls == "teapot"
    text = caption(ind, "hatched")
    assert text.startswith("a photo of a") and "teapot" in text and "hatched ink style" in text
    assert "sks teapot" in caption(ind, "flat", subject="sks teapot")
    assert {"teapot", "hatched", "watercolor"} <= set(vocabulary())


@pytest.mark.parametrize("bad, match", [("kettle_01", "unknown class 'kettle'"), ("teapot", "not an individual"),
                                         ("teapot_42", "out of range")])
def test_bad_names_are_clear_errors(bad, match):
    with pytest.raises(UserInputError, match=match):
        parse_individual(bad)


def test_unknown_style_is_a_clear_error():
    with pytest.raises(UserInputError, match="unknown style 'cubist'"):
        render(individual("mug", 0), "cubist", 0)
