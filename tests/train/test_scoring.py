"""The shapes scorer: many phrasings of one fact give one key; wrong or hedging answers never score right."""

from __future__ import annotations

import pytest

from llavakit.train.scoring import REGIONS, answer_key, canonical_type, describe_recall, is_right, normalize

RC, BS, GT = ("red", "circle"), ("blue", "square"), ("green", "triangle")


@pytest.mark.parametrize("text, key", [
    ("A red circle, a blue square and a green triangle.", (BS, GT, RC)),
    ("a green triangle, a red circle and a blue square", (BS, GT, RC)),
    ("There are three shapes: a red circle, a blue square and a green triangle.", (BS, GT, RC)),
    ("I can see one red circle, one blue square, and one green triangle.", (BS, GT, RC)),
    ("The image shows a small red circle, a large blue square and a green triangle on a white background.",
     (BS, GT, RC)),
    ("Red circle, blue square, green triangle", (BS, GT, RC)),
    ("A RED CIRCLE AND A BLUE SQUARE!", (BS, RC)),
    ("A red circle.", (RC,)),
    ("two red circles and a blue square", (BS, RC, RC)),
    ("Two red circles.", (RC, RC)),
    ("red and blue circles", (("blue", "circle"), RC)),
    ("A grey square and a gray circle", (("gray", "circle"), ("gray", "square"))),
    ("There is a purple triangle next to an orange circle.", (("orange", "circle"), ("purple", "triangle"))),
    ("a circle", (("", "circle"),)),
    ("A dark blue square", (BS,)),
])
def test_describe_phrasings(text, key):
    assert answer_key("describe", text) == key


@pytest.mark.parametrize("text", ["", "Nothing.", "I see some shapes on a white background.", "red, blue"])
def test_describe_without_shapes_is_none(text):
    assert answer_key("describe", text) is None


def test_describe_wrong_answers():
    ref = "A red circle and a blue square."
    assert is_right("describe", "A blue square and a red circle.", ref)  # order does not matter
    assert is_right("describe", "There are two shapes: a red circle and a blue square.", ref)
    for got in ("A red circle.",                                   # one missing
                "A red circle, a blue square and a green triangle.",  # one extra
                "A red circle and a blue circle.",                 # wrong kind
                "A red circle and a green square.",                # wrong colour
                "Two red circles and a blue square.",              # counted twice
                "A circle and a square.",                          # no colours
                "A red circle and a gray square."):
        assert not is_right("describe", got, ref), got


def test_describe_recall_and_precision():
    ref = "A red circle, a blue square and a green triangle."
    assert describe_recall(ref, ref) == (1.0, 1.0)
    assert describe_recall("A red circle.", ref) == (pytest.approx(1 / 3), 1.0)
    assert describe_recall("A red circle and a yellow square.", ref) == (pytest.approx(1 / 3), 0.5)
    assert describe_recall("Two red circles.", ref) == (pytest.approx(1 / 3), 0.5)
    assert describe_recall("I don't know.", ref) == (0.0, 0.0)
    with pytest.raises(ValueError, match="names no shape"):
        describe_recall("A red circle.", "There are three shapes.")


@pytest.mark.parametrize("text, key", [
    ("There are three shapes.", 3), ("There is one shape.", 1), ("3", 3), ("Three.", 3), ("five", 5),
    ("There is a single shape.", 1), ("There's only one shape in the picture.", 1), ("I count 4 shapes.", 4),
    ("The image contains two objects.", 2), ("There are exactly five shapes.", 5), ("Ten.", 10),
    ("There are three shapes: two circles and a square.", 3),
    ("There are 4 shapes: a red circle, a blue square, a green triangle and a yellow circle.", 4),
    ("There is just a shape.", 1), ("There are three colored shapes.", 3),
])
def test_count_phrasings(text, key):
    assert answer_key("count", text) == key


@pytest.mark.parametrize("text", ["Some shapes.", "There are two or three shapes.", "", "A red circle."])
def test_count_unclear_is_none(text):
    assert answer_key("count", text) is None


def test_count_wrong_answers():
    assert not is_right("count", "There are four shapes.", "There are three shapes.")
    assert not is_right("count", "I'm not sure.", "There are three shapes.")
    assert is_right("count", "3", "There are three shapes.")


@pytest.mark.parametrize("text, key", [
    ("The circle is red.", "red"), ("red", "red"), ("It's RED!", "red"), ("The colour is blue.", "blue"),
    ("The color of the square is green.", "green"), ("It is a red circle.", "red"),
    ("The circle is red, on a white background.", "red"), ("Purple.", "purple"), ("orange", "orange"),
    ("The circle is grey.", "gray"), ("The circle is gray.", "gray"), ("The red circle is blue.", "blue"),
])
def test_colour_phrasings(text, key):
    assert answer_key("colour", text) == key
    assert answer_key("color", text) == key  # the old files' type name


@pytest.mark.parametrize("text", ["The circle is red and the square is blue.", "Red or orange.", "I can't tell.",
                                  "", "It has no colour."])
def test_colour_hedges_are_none(text):
    assert answer_key("colour", text) is None


def test_colour_wrong_answers():
    assert not is_right("colour", "The circle is orange.", "The circle is red.")
    assert not is_right("colour", "red and blue", "The circle is red.")
    assert is_right("colour", "Red.", "The circle is red.")


@pytest.mark.parametrize("text, key", [
    ("The circle is left of the square.", "left"), ("The circle is to the left of the square.", "left"),
    ("left", "left"), ("Left.", "left"), ("It is on the right side of the square.", "right"),
    ("The circle is above the square.", "above"), ("The circle is on top of the square.", "above"),
    ("It sits higher than the square.", "above"), ("The circle is below the square.", "below"),
    ("It is under the square.", "below"), ("The circle lies beneath the square.", "below"),
    ("the circle left; the square middle; so left", "left"),
    ("the circle left; the square right; so left", "left"),
    ("The circle is further up than the square.", "above"),
])
def test_position_phrasings(text, key):
    assert answer_key("position", text) == key


@pytest.mark.parametrize("text", ["Left or right.", "The circle is left of and above the square.", "", "Yes."])
def test_position_hedges_are_none(text):
    assert answer_key("position", text) is None


def test_position_wrong_answers():
    assert not is_right("position", "The circle is right of the square.", "The circle is left of the square.")
    assert not is_right("position", "The circle is above the square.", "The circle is left of the square.")


@pytest.mark.parametrize("text, key", [
    ("The circle is in the top left.", "top left"), ("in the top left", "top left"),
    ("top-left corner", "top left"), ("It is in the upper left.", "top left"),
    ("In the upper-left part of the image.", "top left"), ("The circle is at the top.", "top"),
    ("At the top, in the middle.", "top"), ("top centre", "top"), ("top center", "top"),
    ("The circle is in the top right.", "top right"), ("The circle is on the left.", "left"),
    ("On the left side, halfway down... in the middle-left.", "left"),
    ("The circle is in the centre.", "centre"), ("center", "centre"), ("In the middle of the picture.", "centre"),
    ("It is centered.", "centre"), ("The circle is on the right.", "right"), ("centre right", "right"),
    ("The circle is in the bottom left.", "bottom left"), ("lower left corner", "bottom left"),
    ("The circle is at the bottom.", "bottom"), ("bottom middle", "bottom"),
    ("The circle is in the bottom right.", "bottom right"), ("Bottom-right corner.", "bottom right"),
    ("In the lower right of the image.", "bottom right"), ("the triangle top right", "top right"),
    ("On the left-hand side.", "left"),
])
def test_where_phrasings(text, key):
    assert answer_key("where", text) == key
    assert key in REGIONS


@pytest.mark.parametrize("text", ["The circle is in the top left and the square in the bottom right.",
                                  "top or bottom", "Somewhere.", "", "left or right"])
def test_where_hedges_are_none(text):
    assert answer_key("where", text) is None


def test_where_wrong_answers():
    ref = "The circle is in the top left."
    assert not is_right("where", "The circle is at the top.", ref)  # top is not top left
    assert not is_right("where", "The circle is on the left.", ref)
    assert not is_right("where", "The circle is in the top right.", ref)
    assert not is_right("where", "at the top", "The circle is in the top right.")
    assert not is_right("where", "in the centre", "The circle is on the left.")
    assert is_right("where", "upper left corner", ref)


@pytest.mark.parametrize("text, key", [
    ("The first picture has more shapes.", "first"), ("The second picture has more shapes.", "second"),
    ("the first", "first"), ("Second.", "second"), ("The second one.", "second"), ("Picture 2.", "second"),
    ("Image one has more.", "first"), ("The 1st image.", "first"), ("The 2nd.", "second"),
    ("The first picture has more shapes than the second.", "first"),
    ("The second picture has more shapes than the first one.", "second"),
    ("The first picture has fewer shapes than the second.", "second"), ("The latter.", "second"),
    ("The left image has more shapes.", "first"),
])
def test_compare_phrasings(text, key):
    assert answer_key("compare", text) == key


@pytest.mark.parametrize("text", ["The first or the second.", "Both have the same number.", "", "Neither."])
def test_compare_hedges_are_none(text):
    assert answer_key("compare", text) is None


def test_compare_wrong_answers():
    assert not is_right("compare", "The second picture has more shapes.", "The first picture has more shapes.")


@pytest.mark.parametrize("text, key", [
    ("The red circle moves left.", "left"), ("left", "left"), ("It moves to the left.", "left"),
    ("Leftwards.", "left"), ("It goes from right to left.", "left"), ("From left to right.", "right"),
    ("The red circle moves right.", "right"), ("rightward", "right"), ("It moves up.", "up"),
    ("Upward.", "up"), ("upwards", "up"), ("It rises towards the top.", "up"), ("It moves down.", "down"),
    ("Downwards.", "down"), ("It falls to the bottom.", "down"), ("from the top to the bottom", "down"),
    ("It drops.", "down"), ("The square slides to the RIGHT.", "right"),
])
def test_motion_phrasings(text, key):
    assert answer_key("motion", text) == key


@pytest.mark.parametrize("text", ["Left or right.", "It moves up and to the left.", "It does not move.", ""])
def test_motion_hedges_are_none(text):
    assert answer_key("motion", text) is None


def test_motion_wrong_answers():
    assert not is_right("motion", "It moves up.", "The red circle moves left.")
    assert not is_right("motion", "It moves right.", "The red circle moves left.")


def test_normalize_and_types():
    assert normalize("The Top-Left COLOUR, grey; Centre!") == "the top left color gray centre"
    assert canonical_type("color") == "colour" and canonical_type("describe") == "describe"
    assert canonical_type("caption") is None
    with pytest.raises(ValueError, match="no scorer for question type 'caption'"):
        answer_key("caption", "A red circle.")
