"""Equivalent layer-map spellings are one trial with one config hash (config/layer_map.canonical_layer_map).

README: grid combinations "that then resolve to the same trial are collapsed into one", and the config hash is
the "hash of exactly the settings that take effect". On the quickstart's 2-layer student of the 6-layer
MiniLM teacher, `uniform`, `'1:3,2:6'` and `[3, 6]` are the same layer pairs (1,3),(2,6), so they must be one
trial; trials written with a named map keep the hash they had before (MLflow stores dedupe finished runs by it).
"""

from __future__ import annotations

import pytest

from conftest import REPO
from kdplatform.config import load_trials
from kdplatform.config.layer_map import canonical_layer_map, resolve_layer_map

QUICKSTART = REPO / "sweeps" / "quickstart.yaml"
# cfg hashes of sweeps/quickstart.yaml's trials computed on the code before canonical layer maps (commit
# 5034675): named maps and trials without a map must keep them.
QUICKSTART_HASHES = {"sst2/kd/b32/s42": "3e3930dfd719af3c", "sst2/tinybert/uniform/b32/s42": "65b4ce91327ebd40",
                     "sst2/ild_last/b32/s42": "0f11dcb69da56bea", "sst2/cr_ild/w0.5/b32/s42": "f49f3cb583e4f5b9"}
# the same, for a quickstart tinybert trial with layer_map: last (pairs (2, 6))
TINYBERT_LAST_HASH = "e122b3b0afdbfa21"


def quickstart(*overrides: str):
    """(trials, notes) of the quickstart file with command-line style overrides."""
    _, trials, notes = load_trials(QUICKSTART, list(overrides))
    return trials, notes


def tinybert(layer_map: str):
    """The one quickstart tinybert trial with this layer map (YAML text, as on the command line)."""
    trials, _ = quickstart("grid.method=[tinybert]", f"grid.layer_map=[{layer_map}]")
    assert len(trials) == 1
    return trials[0]


# ------------------------------------------------------------------------------- (a) one trial, one hash
def test_three_spellings_of_uniform_are_one_trial_of_the_grid():
    trials, notes = quickstart("grid.method=[tinybert]", "grid.layer_map=[uniform, '1:3,2:6', [3,6]]")
    assert len(trials) == 1, [t.run_name for t in trials]
    trial = trials[0]
    assert trial.cfg_hash == QUICKSTART_HASHES["sst2/tinybert/uniform/b32/s42"]
    assert trial.run_name == "sst2/tinybert/uniform/b32/s42"
    assert trial.train[0].losses[0].layer_pairs == [(0, 0), (1, 3), (2, 6)]
    collapsed = [n for n in notes if "collapsed" in n]
    assert sum(int(n.split(" ")[0]) for n in collapsed) == 2, notes
    assert any("'1:3,2:6' maps the layers as 'uniform'" in n for n in collapsed), notes  # the reason is told


@pytest.mark.parametrize("spelling", ["uniform", "'1:3,2:6'", "[3,6]", "'3,6'", "' 2:6 , 1:3 '", "'1:3, 2:6'"])
def test_every_spelling_of_uniform_has_the_hash_of_uniform(spelling):
    trial = tinybert(spelling)
    assert trial.cfg_hash == QUICKSTART_HASHES["sst2/tinybert/uniform/b32/s42"]
    assert trial.layer_map == "uniform" and trial.hashed_dict() == tinybert("uniform").hashed_dict()


@pytest.mark.parametrize("spelling", ["last", "'2:6'", "' 2 : 6 '"])
def test_every_spelling_of_last_has_the_hash_of_last(spelling):
    assert tinybert(spelling).cfg_hash == TINYBERT_LAST_HASH


def test_explicit_maps_that_are_no_named_map_collapse_to_one_spelling():
    lists = {tinybert(s).cfg_hash for s in ("[2,6]", "'2,6'", "'1:2,2:6'", "'2:6,1:2'", "'1:2 ,2:6'")}
    assert len(lists) == 1
    subset = {tinybert(s).cfg_hash for s in ("'1:2'", "' 1 : 2 '")}
    assert len(subset) == 1
    assert tinybert("[2,6]").run_name == "sst2/tinybert/2-6/b32/s42"


def test_a_loss_terms_own_layer_map_is_canonical_too():
    def custom(layer_map: str):
        trials, notes = quickstart("grid.method=[custom]", "train=[{name: s1, losses: [{name: relation_kl, "
                                   f"layer_map: {layer_map}}}, {{name: logit_kd}}]}}]")
        return trials[0], notes

    (last, _), (pair, notes) = custom("last"), custom("'2:6'")
    assert pair.cfg_hash == last.cfg_hash and pair.train[0].losses[0].layer_map == "last"
    assert any("train[0].losses[0].layer_map '2:6' maps the layers as 'last'" in n for n in notes), notes
    assert custom("[3,6]")[0].cfg_hash == custom("uniform")[0].cfg_hash != last.cfg_hash


# ------------------------------------------------------------------------------- (b) other maps differ
def test_a_different_map_is_a_different_trial():
    trials, _ = quickstart("grid.method=[tinybert]", "grid.layer_map=[[3,6], [2,6], '1:3', last]")
    assert len(trials) == 4 and len({t.cfg_hash for t in trials}) == 4
    assert tinybert("[2,6]").cfg_hash != tinybert("[3,6]").cfg_hash
    assert tinybert("[2,6]").train[0].losses[1].layer_pairs == [(1, 2), (2, 6)]


# ------------------------------------------------------------------------- (c) named maps keep their hash
def test_quickstart_hashes_are_unchanged():
    trials, _ = quickstart()
    assert {t.run_name: t.cfg_hash for t in trials} == QUICKSTART_HASHES


def test_a_named_map_keeps_its_hash():
    assert tinybert("uniform").cfg_hash == "65b4ce91327ebd40"
    assert tinybert("last").cfg_hash == TINYBERT_LAST_HASH


# --------------------------------------------------------------------------- the canonical rule itself
@pytest.mark.parametrize("spec,n_s,n_t,canonical", [
    ("uniform", 2, 6, "uniform"), ("last", 2, 6, "last"),  # named maps are kept as written
    ("last", 1, 6, "last"), ("uniform", 1, 6, "uniform"),  # ... even where they are the same pairs
    ([3, 6], 2, 6, "uniform"), ("3,6", 2, 6, "uniform"), ("2:6, 1:3", 2, 6, "uniform"),
    ("2:6", 2, 6, "last"), ([6], 1, 6, "uniform"),  # uniform is preferred where both fit
    ([2, 4, 6, 8, 10, 12], 6, 12, "uniform"), ("1:2,2:4", 4, 12, "1:2,2:4"),
    ("2:6,1:2", 2, 6, [2, 6]), ("1:6,2:6", 2, 6, [6, 6]), ("2,4,6", 3, 6, "uniform"), ("4,5,6", 3, 6, [4, 5, 6]),
    ("1:2", 2, 6, "1:2"), (" 1 : 2 ", 2, 6, "1:2"), ("3:6,1:2", 3, 6, "1:2,3:6"),
    ("1:9", 2, 6, "1:9"), ([1, 2, 3], 2, 6, [1, 2, 3]),  # does not fit: unchanged (resolving it raises)
])
def test_canonical_layer_map(spec, n_s, n_t, canonical):
    assert canonical_layer_map(spec, n_s, n_t) == canonical
    try:
        pairs = sorted(resolve_layer_map(spec, n_s, n_t))
    except ValueError:
        return
    assert sorted(resolve_layer_map(canonical, n_s, n_t)) == pairs  # the same layer pairs
    assert canonical_layer_map(canonical, n_s, n_t) == canonical  # and canonical stays canonical
