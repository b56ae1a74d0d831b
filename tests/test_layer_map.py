"""Layer mappings as data (config/layer_map.py): uniform, last, explicit lists, 's:t' pairs, and errors that
say which side (student or teacher) is out of range."""

from __future__ import annotations

import doctest

import pytest

from kdplatform.config import layer_map as mapping
from kdplatform.config.layer_map import LayerMapError, layer_map_label, resolve_layer_map, with_embeddings


def test_module_doctest_passes():
    assert doctest.testmod(mapping, verbose=False).failed == 0


# -------------------------------------------------------------------------------------------- uniform
@pytest.mark.parametrize("n_t,n_s,expected", [
    (6, 2, [(1, 3), (2, 6)]),
    (12, 6, [(1, 2), (2, 4), (3, 6), (4, 8), (5, 10), (6, 12)]),
    (12, 4, [(1, 3), (2, 6), (3, 9), (4, 12)]),
    (12, 3, [(1, 4), (2, 8), (3, 12)]),
    (4, 2, [(1, 2), (2, 4)]),
    (6, 6, [(i, i) for i in range(1, 7)]),  # same depth (KD-QAT teacher copy): identity
    (24, 6, [(1, 4), (2, 8), (3, 12), (4, 16), (5, 20), (6, 24)]),
])
def test_uniform_divisible(n_t, n_s, expected):
    # DESIGN: student layer i (1-based) -> teacher layer i * k, k = L_t / L_s
    assert resolve_layer_map("uniform", n_student=n_s, n_teacher=n_t) == expected


@pytest.mark.parametrize("n_t,n_s", [(12, 5), (12, 7), (6, 4), (6, 5), (7, 2), (5, 2), (9, 2), (12, 8),
                                      (24, 9), (3, 2)])
def test_uniform_non_divisible_is_increasing_in_range_and_within_half_a_layer(n_t, n_s):
    pairs = resolve_layer_map("uniform", n_student=n_s, n_teacher=n_t)
    assert [s for s, _ in pairs] == list(range(1, n_s + 1))
    teachers = [t for _, t in pairs]
    assert all(1 <= t <= n_t for t in teachers)
    assert teachers == sorted(set(teachers)), "two student layers share a teacher layer or go backwards"
    assert teachers[-1] == n_t  # the last student layer always learns from the last teacher layer
    k = n_t / n_s
    for i, t in pairs:
        assert abs(t - i * k) <= 0.5


def test_uniform_non_divisible_examples():
    assert resolve_layer_map("uniform", 5, 12) == [(1, 2), (2, 5), (3, 7), (4, 10), (5, 12)]
    assert resolve_layer_map("uniform", 3, 8) == [(1, 3), (2, 5), (3, 8)]


def test_uniform_refuses_a_student_deeper_than_the_teacher_naming_both():
    with pytest.raises(LayerMapError) as e:
        resolve_layer_map("uniform", n_student=4, n_teacher=2)
    msg = str(e.value)
    assert "student 4" in msg and "teacher 2" in msg


# ----------------------------------------------------------------------------------------------- last
@pytest.mark.parametrize("n_s,n_t", [(2, 6), (4, 12), (6, 6), (1, 24)])
def test_last_maps_only_the_last_layers(n_s, n_t):
    assert resolve_layer_map("last", n_s, n_t) == [(n_s, n_t)]


# ------------------------------------------------------------------------------------ explicit lists
@pytest.mark.parametrize("spec", [[2, 4, 6], "2,4,6", " 2, 4 ,6 ", ["2", "4", "6"]])
def test_list_of_teacher_layers_one_per_student_layer(spec):
    assert resolve_layer_map(spec, n_student=3, n_teacher=6) == [(1, 2), (2, 4), (3, 6)]


def test_skip_mapping_of_papers():
    # PKD-skip / TinyBERT 12 -> 6 written out
    assert resolve_layer_map("2,4,6,8,10,12", 6, 12) == [(i, 2 * i) for i in range(1, 7)]


def test_pairs_student_colon_teacher_may_cover_a_subset():
    assert resolve_layer_map("1:3,2:6", 2, 6) == [(1, 3), (2, 6)]
    assert resolve_layer_map("2:6", 2, 6) == [(2, 6)]
    assert resolve_layer_map(" 2 : 5 , 1:1", 2, 6) == [(2, 5), (1, 1)]  # order kept as written
    # many student layers may share a teacher layer (not the other way round)
    assert resolve_layer_map("1:6,2:6", 2, 6) == [(1, 6), (2, 6)]


def test_list_length_must_match_the_student():
    with pytest.raises(LayerMapError, match="one entry per student layer") as e:
        resolve_layer_map("2,4,6", n_student=2, n_teacher=6)
    assert "got 3" in str(e.value) and "the student has 2" in str(e.value)


# --------------------------------------------------------------------- errors name the wrong side
@pytest.mark.parametrize("spec,n_s,n_t,bad", [
    ("2,4,7", 3, 6, 7), ([2, 4, 9], 3, 6, 9), ("1:7", 2, 6, 7), ("2:13", 2, 12, 13), ("1:0", 2, 6, 0),
    ("0,2", 2, 6, 0), ("-1,2", 2, 6, -1),
])
def test_teacher_out_of_range_names_the_teacher_only(spec, n_s, n_t, bad):
    with pytest.raises(LayerMapError) as e:
        resolve_layer_map(spec, n_student=n_s, n_teacher=n_t)
    msg = str(e.value)
    assert f"teacher layer {bad}" in msg and f"1..{n_t}" in msg
    assert "student" not in msg


@pytest.mark.parametrize("spec,n_s,n_t,bad", [("3:6", 2, 6, 3), ("0:2", 2, 6, 0), ("1:2,5:6", 4, 6, 5),
                                              ("-1:2", 2, 6, -1)])
def test_student_out_of_range_names_the_student_only(spec, n_s, n_t, bad):
    with pytest.raises(LayerMapError) as e:
        resolve_layer_map(spec, n_student=n_s, n_teacher=n_t)
    msg = str(e.value)
    assert f"student layer {bad}" in msg and f"1..{n_s}" in msg
    assert "teacher" not in msg


def test_both_sides_wrong_reports_the_student_first():
    with pytest.raises(LayerMapError, match="student layer 3"):
        resolve_layer_map("3:9", 2, 6)


@pytest.mark.parametrize("spec,match", [
    ("", "empty layer map"), (" , ", "empty layer map"), ([], "empty layer map"),
    ("1:3,6", "mix of 's:t' pairs"), ("a:3", "not a 'student:teacher' pair"), ("1:b", "not a 'student:teacher'"),
    ("foo", "neither 'uniform', 'last'"), ("Uniform", "neither"), ("2,x", "neither"),
    ("1:3,1:4", "appears twice"),
])
def test_malformed_specs(spec, match):
    with pytest.raises(LayerMapError, match=match):
        resolve_layer_map(spec, n_student=2, n_teacher=6)


def test_layer_map_error_is_a_value_error():
    assert issubclass(LayerMapError, ValueError)


# ---------------------------------------------------------------------------------- with_embeddings
def test_with_embeddings_prepends_the_embedding_pair_once():
    assert with_embeddings([(1, 3), (2, 6)]) == [(0, 0), (1, 3), (2, 6)]
    assert with_embeddings([(0, 0), (1, 3)]) == [(0, 0), (1, 3)]
    assert with_embeddings([]) == [(0, 0)]
    assert with_embeddings(resolve_layer_map("uniform", 2, 6)) == [(0, 0), (1, 3), (2, 6)]


# ---------------------------------------------------------------------------------- layer_map_label
@pytest.mark.parametrize("spec,label", [
    (None, "-"), ("uniform", "uniform"), ("last", "last"), ([2, 4, 6], "2-4-6"), ("2,4,6", "2-4-6"),
    ("2, 4, 6", "2-4-6"), ("1:3,2:6", "1:3-2:6"),
])
def test_layer_map_label(spec, label):
    assert layer_map_label(spec) == label
    assert "/" not in label and "," not in label  # safe inside 'task/method/map/...' run names
