"""What the named presets resolve to (issue 11, config side) and the config-hash policy (issue 15).

The expected layer pairs are written from the definitions (CR-ILD distils the last student layer into the
last teacher layer), never read back from the code under test.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from conftest import REPO
from kdplatform.config import DEFINITION_CHANGES, describe_trial, load_trials

# Hashes of sweeps/quickstart.yaml's trials computed on the code before the config package (commit 8df883e).
QUICKSTART_BEFORE = {"kd": "3e3930dfd719af3c", "tinybert": "4a25bc10eaae95a6", "ild_last": "0f11dcb69da56bea",
                     "cr_ild": "3b2a9613e5e9114b"}
QUICKSTART_TEACHER_BEFORE = "1e1ee49002d1cbdd"


def trials_of(tmp_path: Path, text: str):
    path = tmp_path / "t.yaml"
    path.write_text("name: fidelity\nteacher: {model: minilm-l6}\n" + textwrap.dedent(text))
    return load_trials(path)


# ------------------------------------------------------------------------------------- cr_ild layers
LAYER_MAPS = ["uniform", "last", "'1,2,3,4,5,6'", "'1:2,2:4'", "[1, 2, 3, 4, 5, 6]", "'3:3'"]


def test_cr_ild_is_last_layer_under_every_layer_map(tmp_path):
    _, trials, notes = trials_of(tmp_path, f"""
        task: rte
        student: {{layers: 4}}
        method: cr_ild
        grid: {{layer_map: [{', '.join(LAYER_MAPS)}]}}
        """)
    assert len(trials) == 1, "every layer map value is the same cr_ild trial"
    ild = trials[0].train[0]
    assert [(t.name, t.layer_pairs) for t in ild.losses] == [("relation_kl", [(4, 6)])]
    assert trials[0].layer_map is None and "/uniform/" not in trials[0].run_name
    assert any(n.startswith(f"{len(LAYER_MAPS) - 1} trial(s) collapsed: layer_map has no effect on method "
                            "cr_ild") for n in notes), notes


@pytest.mark.slow
@pytest.mark.parametrize("study", ["cr_ild.yaml", "glue_all.yaml"])
def test_cr_ild_is_last_layer_in_the_study_files(study):
    _, trials, _ = load_trials(REPO / "sweeps" / study)
    cr = [t for t in trials if t.method == "cr_ild"]
    assert cr
    for t in cr:  # 6-layer students of a 12-layer BERT-base: the one pair (6, 12)
        assert (t.student_layers, t.teacher_layers) == (6, 12)
        assert [tm.layer_pairs for tm in t.train[0].losses] == [[(6, 12)]], t.run_name
    uniform = [t for t in trials if t.method == "minilm" and t.layer_map == "uniform"]
    assert uniform and uniform[0].train[0].losses[0].layer_pairs == [(i, 2 * i) for i in range(1, 7)]


# ---------------------------------------------------------------------------- projection, consistency
def test_projection_defaults_follow_the_reference_per_preset(tmp_path):
    _, trials, _ = trials_of(tmp_path, """
        task: sst2
        student: {layers: 2}
        layer_map: uniform
        grid: {method: [tinybert, pkd, kdqat_map]}
        """)
    proj = {(t.method, term.name): term.projection for t in trials for s in t.train for term in s.losses
            if term.name in ("hidden_mse", "pkd")}
    assert proj == {("tinybert", "hidden_mse"): True, ("pkd", "pkd"): True, ("kdqat_map", "hidden_mse"): False}


def test_projection_can_be_turned_off_for_tinybert(tmp_path):
    _, trials, _ = trials_of(tmp_path, """
        task: sst2
        student: {layers: 2}
        method: tinybert
        train: [{name: ild, losses: [{name: hidden_mse, include_embeddings: true, projection: false},
                                     {name: attention_kl}]}]
        """)
    assert trials[0].train[0].losses[0].projection is False
    assert trials[0].cfg_hash != QUICKSTART_BEFORE["tinybert"]


def test_consistency_defaults_are_the_papers_and_the_options_stay(tmp_path):
    _, trials, _ = trials_of(tmp_path, "task: sst2\nstudent: {layers: 2}\nmethod: cr_ild\n")
    c = trials[0].train[0].consistency
    assert (c.weight, c.losses, c.ramp, c.target, trials[0].consistency_weight) == \
        (0.1, ["attention_kl", "hidden_mse"], "epoch", "no_grad", 0.1)
    _, trials, _ = trials_of(tmp_path, """
        task: sst2
        student: {layers: 2}
        method: cr_ild
        consistency_weight: 1.0
        train: [{name: ild, consistency: {losses: [relation_kl], ramp: step}}]
        """)
    c = trials[0].train[0].consistency
    assert (c.weight, c.losses, c.ramp) == (1.0, ["relation_kl"], "step")


# ------------------------------------------------------------------------------------ study protocol
def test_kd_qat_study_evaluates_small_tasks_often_at_the_references_length():
    _, trials, _ = load_trials(REPO / "sweeps" / "kd_qat.yaml")
    for t in trials:
        stage = t.train[0]
        assert t.data.max_seq_length == 128, t.run_name  # the reference's effective length, CoLA/SST-2 too
        assert stage.eval_every <= (200 if t.task in ("qqp", "mnli", "qnli") else 100), t.run_name
    rte = next(t for t in trials if t.task == "rte")
    steps = 3 * -(-2490 // rte.train[0].batch_size)  # RTE: 2,490 training examples, 3 epochs
    assert steps // rte.train[0].eval_every >= 10, "RTE needs many evaluations to pick the best dev score"


def test_cr_ild_study_teachers_follow_the_reference_protocol():
    _, trials, _ = load_trials(REPO / "sweeps" / "cr_ild.yaml")
    for t in trials:
        ft = t.teacher.finetune
        assert (ft.epochs, ft.batch_size) == ((20 if t.data.max_train_examples == 1000 else 4), 16), t.run_name
        # the reference's default_params: 64 tokens for CoLA and SST-2 (its teacher fine-tune included)
        assert t.data.max_seq_length == (64 if t.task in ("cola", "sst2") else 128), t.run_name
        if t.data.max_train_examples:
            assert t.data.subsample_seed == "run"


def test_cpu_studies_expand_to_the_grids_their_write_up_reports():
    """docs/results/README.md reports these grids: 4 tasks x 6 methods x 3 seeds with one teacher per task,
    and 2 tasks x 4 QAT methods x 3 seeds whose bit-width file adds only its 4- and 8-bit trials."""
    _, cr, _ = load_trials(REPO / "sweeps" / "study_cr_ild_cpu.yaml")
    assert len(cr) == 72 and len({t.teacher_hash for t in cr}) == 4
    assert {(t.student_layers, t.teacher_layers) for t in cr} == {(3, 6)}
    for t in cr:
        if t.method in ("ild_last", "cr_ild"):  # the last layer by definition: 3 -> 6
            assert [tm.layer_pairs for tm in t.train[0].losses] == [[(3, 6)]], t.run_name
        assert t.data.max_train_examples == 1000 and t.data.subsample_seed == "run"
    _, qat, _ = load_trials(REPO / "sweeps" / "study_kd_qat_cpu.yaml")
    assert len(qat) == 24 and {(t.bits, t.act_bits) for t in qat} == {(2, 8)}
    assert {t.student_layers for t in qat} == {6} and len({t.teacher_hash for t in qat}) == 2
    _, bits, _ = load_trials(REPO / "sweeps" / "study_kd_qat_bits_cpu.yaml")
    assert sorted(t.bits for t in bits) == [2, 4, 8]
    main_hashes = {t.cfg_hash for t in qat}
    assert [t.bits for t in bits if t.cfg_hash in main_hashes] == [2], "the 2-bit trial is the main study's"
    assert {t.teacher_hash for t in bits} <= {t.teacher_hash for t in qat}


# --------------------------------------------------------------------------------------- hash policy
def test_quickstart_hashes_are_kept_where_nothing_changed():
    _, trials, _ = load_trials(REPO / "sweeps" / "quickstart.yaml")
    by = {t.method: t for t in trials}
    assert by["kd"].cfg_hash == QUICKSTART_BEFORE["kd"]
    assert by["ild_last"].cfg_hash == QUICKSTART_BEFORE["ild_last"]
    assert {t.teacher_hash for t in trials} == {QUICKSTART_TEACHER_BEFORE}
    # tinybert now learns a projection (the reference's fit_dense); cr_ild's consistency follows the paper
    assert by["tinybert"].cfg_hash != QUICKSTART_BEFORE["tinybert"]
    assert by["cr_ild"].cfg_hash != QUICKSTART_BEFORE["cr_ild"]


def test_a_changed_definition_enters_only_the_hashes_of_trials_it_affects(tmp_path):
    _, trials, _ = trials_of(tmp_path, """
        student: {layers: 2}
        layer_map: uniform
        grid: {task: [sst2, stsb], method: [kd, pkd, kdqat_map], bits: [32, 4], act_bits: [32, 8]}
        """)
    got = {(t.task, t.method, t.bits, t.act_bits, t.student.init): t.hashed_dict().get("definitions", {})
           for t in trials}
    for (task, method, bits, act_bits, init), versions in got.items():
        expected = {}
        if task == "stsb" and init != "teacher_copy":  # a new regression head starts at the label mean
            expected["regression_head_start"] = 2
        if method == "pkd":
            expected["pkd"] = 2
        if task == "stsb" and method in ("kd", "pkd", "kdqat_map"):  # all three predict with logit KD
            expected["logit_kd"] = 2
        if method == "kdqat_map" and act_bits < 32:
            expected["quantized_attention_maps"] = 2
        if bits == 4:
            expected["weights_4bit"] = 2
        if act_bits < 32:  # every quantized-activation trial quantizes its attention probabilities
            expected["attention_probs_after_dropout"] = 2
        if method == "pkd":  # the pkd preset learns a projection (the reference's fit_dense)
            expected["hidden_projection"] = 2
        assert versions == expected, (task, method, bits, act_bits)
    assert {c.name for c in DEFINITION_CHANGES} == {"pkd", "logit_kd", "quantized_attention_maps", "weights_4bit",
                                                    "attention_probs_after_dropout", "embeddings_8bit",
                                                    "hidden_projection", "regression_head_start"}


def test_embedding_grid_change_enters_only_8_bit_trials_with_quantized_embeddings(tmp_path):
    _, trials, _ = trials_of(tmp_path, """
        task: sst2
        method: kd
        student: {layers: 2}
        grid: {bits: [2, 4, 8, 32], student.quantize_embeddings: [true, false]}
        """)
    for t in trials:
        versions = t.hashed_dict().get("definitions", {})
        assert ("embeddings_8bit" in versions) == (t.bits == 8 and t.student.quantize_embeddings), t.run_name


def test_projection_change_enters_only_trials_whose_hidden_mse_projects(tmp_path):
    """ternarybert's hidden_mse has no projection of its own: it projects only when the widths differ, i.e.
    for a student of another model with another width (384 for the MiniLM teacher; this one is 128 wide)."""
    narrow = tmp_path / "narrow"
    narrow.mkdir()
    (narrow / "config.json").write_text('{"model_type": "bert", "hidden_size": 128, "num_hidden_layers": 2}')
    expected = {"truncate": False, "minilm-l6": False, str(narrow): True}
    for init, projects in expected.items():
        _, (trial,), _ = trials_of(tmp_path, f"""
            task: sst2
            method: ternarybert
            bits: 2
            student: {{init: {init}{", layers: 2" if init == "truncate" else ""}}}
            """)  # a named student keeps its own depth (a layers: would be refused)
        assert ("hidden_projection" in trial.hashed_dict().get("definitions", {})) == projects, init


# ----------------------------------------------------------------------------------------- describe
def test_describe_shows_each_term_with_its_layer_pairs_and_weight():
    _, trials, _ = load_trials(REPO / "sweeps" / "quickstart.yaml")
    by = {t.method: describe_trial(t) for t in trials}
    assert by["tinybert"] == ["ild: 2 epochs, lr 0.0003, batch 32, eval every 25",
                              "  hidden_mse x1 on (0,0) (1,3) (2,6) projected",
                              "  attention_kl x1 on (1,3) (2,6)",
                              "pred: 3 epochs, lr 0.0005, batch 32, eval every 25",
                              "  logit_kd x1 T=2"]
    assert by["cr_ild"][1:3] == ["  relation_kl x1 on (2,6) [q,k,v]",
                                 "  consistency x0.5 (ramp epoch): attention_kl + hidden_mse on the last student "
                                 "layer (2), target no_grad"]
