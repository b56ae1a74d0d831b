"""Settings that have no effect: each is applied, refused with a message naming it, or normalised with a note.

Issue 15's list, one test per option, through the public `load_trials` / `parse_spec` on real YAML files.
A normalised setting leaves the config hash of the trial equal to the hash of the same trial without it.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from kdplatform.config import ConfigError, load_trials

BASE = "name: effects\ntask: sst2\n"
DEFAULTS = {"teacher": "teacher: {model: minilm-l6}\n", "student": "student: {layers: 2}\n"}  # unless given


def trials_of(tmp_path: Path, text: str, name: str = "t.yaml"):
    text = textwrap.dedent(text)
    path = tmp_path / name
    path.write_text(BASE + "".join(v for k, v in DEFAULTS.items() if f"\n{k}:" not in "\n" + text) + text)
    return load_trials(path)


def one(tmp_path: Path, text: str, name: str = "t.yaml"):
    _, trials, notes = trials_of(tmp_path, text, name)
    assert len(trials) == 1, [t.run_name for t in trials]
    return trials[0], notes


def refused(tmp_path: Path, text: str) -> ConfigError:
    with pytest.raises(ConfigError) as e:
        trials_of(tmp_path, text)
    return e.value


# ------------------------------------------------------------------------------ quantizer settings
@pytest.mark.parametrize("setting", ["two_bit: uniform", "weight_clip: 1.0", "quantize_embeddings: true"])
def test_weight_quantizer_settings_at_32_bits_are_normalised(tmp_path, setting):
    plain, _ = one(tmp_path, "method: kd\n", "a.yaml")
    trial, notes = one(tmp_path, f"method: kd\nstudent: {{layers: 2, {setting}}}\n", "b.yaml")
    field = setting.split(":")[0]
    assert trial.cfg_hash == plain.cfg_hash
    assert getattr(trial.student, field) == getattr(plain.student, field)
    assert notes == [f"1 trial(s) normalised: student.{field} has no effect at bits 32 (weights are not "
                     "quantized) (set to its default)"]


@pytest.mark.parametrize("setting", ["two_bit: uniform", "weight_clip: 1.0", "quantize_embeddings: true"])
def test_weight_quantizer_settings_apply_at_2_bits(tmp_path, setting):
    plain, _ = one(tmp_path, "method: kd\nbits: 2\n", "a.yaml")
    trial, notes = one(tmp_path, f"method: kd\nbits: 2\nstudent: {{layers: 2, {setting}}}\n", "b.yaml")
    assert trial.cfg_hash != plain.cfg_hash and notes == []


def test_two_bit_mode_at_8_bits_is_normalised(tmp_path):
    plain, _ = one(tmp_path, "method: kd\nbits: 8\n", "a.yaml")
    trial, notes = one(tmp_path, "method: kd\nbits: 8\nstudent: {layers: 2, two_bit: uniform}\n", "b.yaml")
    assert trial.cfg_hash == plain.cfg_hash and trial.student.two_bit == "ternary"
    assert "student.two_bit has no effect at bits 8" in notes[0]


def test_act_clip_without_activation_quantization_is_normalised(tmp_path):
    plain, _ = one(tmp_path, "method: kd\n", "a.yaml")
    trial, notes = one(tmp_path, "method: kd\nstudent: {layers: 2, act_clip: 4.0}\n", "b.yaml")
    assert trial.cfg_hash == plain.cfg_hash and "student.act_clip has no effect at act_bits 32" in notes[0]
    on8, _ = one(tmp_path, "method: kd\nact_bits: 8\n", "c.yaml")
    clip8, notes8 = one(tmp_path, "method: kd\nact_bits: 8\nstudent: {layers: 2, act_clip: 4.0}\n", "d.yaml")
    assert clip8.cfg_hash != on8.cfg_hash and notes8 == [] and clip8.student.act_clip == 4.0


# ------------------------------------------------------------------------------------- consistency
def test_ema_decay_with_no_grad_target_is_dropped_with_a_note(tmp_path):
    plain, _ = one(tmp_path, "method: cr_ild\n", "a.yaml")
    trial, notes = one(tmp_path, "method: cr_ild\ntrain: [{name: ild, consistency: {target: no_grad, "
                                 "ema_decay: 0.9}}]\n", "b.yaml")
    assert trial.cfg_hash == plain.cfg_hash and trial.train[0].consistency.ema_decay is None
    assert "ema_decay has no effect with target no_grad" in notes[0]


def test_ema_decay_applies_with_ema_target(tmp_path):
    _, trials, notes = trials_of(tmp_path, """
        method: cr_ild
        train: [{name: ild, consistency: {target: ema}}]
        grid: {train.ild.consistency.ema_decay: [0.9, 0.99]}
        """)
    assert sorted(t.train[0].consistency.ema_decay for t in trials) == [0.9, 0.99] and notes == []


# --------------------------------------------------------------------------------- supplementary data
def test_supplementary_examples_without_tasks_are_normalised(tmp_path):
    plain, _ = one(tmp_path, "method: kd\n", "a.yaml")
    trial, notes = one(tmp_path, "method: kd\ndata: {supplementary_examples: 100}\n", "b.yaml")
    assert trial.cfg_hash == plain.cfg_hash and trial.data.supplementary_examples is None
    assert "data.supplementary_examples has no effect without supplementary tasks" in notes[0]


def test_supplementary_tasks_on_a_method_without_that_stage_are_normalised(tmp_path):
    _, trials, notes = trials_of(tmp_path, """
        data: {supplementary_tasks: [qnli], supplementary_examples: 50}
        grid: {method: [kd, supplementary_ild]}
        """)
    by = {t.method: t for t in trials}
    assert by["kd"].data.supplementary_tasks == [] and by["kd"].data.supplementary_examples is None
    assert by["supplementary_ild"].data.supplementary_tasks == ["qnli"]
    assert by["supplementary_ild"].data.supplementary_examples == 50
    assert any("data.supplementary_tasks has no effect on method kd" in n for n in notes), notes


# ------------------------------------------------------------------------------------------ teacher
def test_teacher_finetune_settings_collapse_when_a_checkpoint_is_given(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"num_hidden_layers": 6, "model_type": "bert"}))
    _, trials, notes = trials_of(tmp_path, f"""
        method: kd
        teacher: {{model: minilm-l6, checkpoint: {ckpt}, seed: 7}}
        grid: {{teacher.finetune.lr: [1.0e-5, 2.0e-5, 3.0e-5]}}
        """)
    assert len(trials) == 1, "three learning rates of a teacher that is not fine-tuned are one trial"
    assert trials[0].teacher.seed == 42 and trials[0].teacher.finetune.lr == 2e-5  # the defaults
    text = " | ".join(notes)
    assert "2 trial(s) collapsed" in text and "teacher.finetune has no effect when teacher.checkpoint is set" \
        in text and "teacher.seed has no effect" in text


# ------------------------------------------------------------------------------ loss-term options
@pytest.mark.parametrize("term, option", [
    ("{name: relation_kl, temperature: 2.0}", "temperature"),
    ("{name: hidden_mse, relations: [q]}", "relations"),
    ("{name: attention_kl, include_embeddings: true}", "include_embeddings"),
    ("{name: attention_kl, projection: true}", "projection"),
    ("{name: logit_kd, layer_map: '1:99'}", "layer_map"),
    ("{name: ce, layer_map: last}", "layer_map"),
])
def test_an_option_the_loss_does_not_read_is_refused(tmp_path, term, option):
    e = refused(tmp_path, f"method: custom\nlayer_map: last\ntrain: [{{name: s1, losses: [{term}]}}]\n")
    assert e.path == f"train[0].losses[0].{option}", str(e)
    assert "does not read" in e.message or "reads no layers" in e.message
    assert e.line is None or e.line > 0


def test_options_a_loss_reads_are_applied(tmp_path):
    trial, _ = one(tmp_path, """
        method: custom
        layer_map: last
        train: [{name: s1, losses: [{name: logit_kd, temperature: 3.0}, {name: relation_kl, relations: [q, k]},
                                    {name: hidden_mse, include_embeddings: true, projection: true}]}]
        """)
    kd, rel, hid = trial.train[0].losses
    assert kd.temperature == 3.0 and rel.relations == ["q", "k"]
    assert hid.layer_pairs == [(0, 0), (2, 6)] and hid.projection is True


# --------------------------------------------------------------------------- search and scheduler
@pytest.mark.parametrize("section", ["search: {algorithm: optuna, num_samples: 2, space: {train.pred.lr: "
                                     "{type: loguniform, low: 1.0e-5, high: 1.0e-3}}}",
                                     "scheduler: {type: asha}"])
def test_keys_that_were_never_read_are_refused(tmp_path, section):
    e = refused(tmp_path, f"method: kd\n{section}\n")
    assert e.path in ("search.algorithm", "scheduler.type") and "does nothing" in e.message and e.line


# ----------------------------------------------------------------------------------- custom stages
def test_a_custom_stage_named_ild_gets_no_preset_defaults(tmp_path):
    stage = "{{name: {}, losses: [{{name: relation_kl, layer_map: last}}]}}"
    ild, _ = one(tmp_path, f"method: custom\ntrain: [{stage.format('ild')}]\n", "a.yaml")
    other, _ = one(tmp_path, f"method: custom\ntrain: [{stage.format('warm')}]\n", "b.yaml")
    a, b = ild.train[0].model_dump(exclude={"name"}), other.train[0].model_dump(exclude={"name"})
    assert a == b and a["epochs"] == 3  # not CR-ILD's 10 ILD epochs for SST-2: the name means nothing


# ------------------------------------------------------------------------------------- teacher cache
def test_teacher_cache_precision_enters_the_hash_when_a_stage_reads_the_cache(tmp_path):
    f16, _ = one(tmp_path, "method: kd\n", "a.yaml")
    f32, _ = one(tmp_path, "method: kd\nspeed: {teacher_cache: {dtype: float32}}\n", "b.yaml")
    off, _ = one(tmp_path, "method: kd\nspeed: {teacher_cache: {enabled: false}}\n", "c.yaml")
    bf16, _ = one(tmp_path, "method: kd\nspeed: {teacher_cache: {dtype: bfloat16}}\n", "d.yaml")
    assert len({f16.cfg_hash, f32.cfg_hash, bf16.cfg_hash}) == 3
    assert off.cfg_hash == f32.cfg_hash  # no cache = exact float32 teacher outputs
    assert "teacher_outputs" not in f16.hashed_dict()  # the float16 default keeps earlier hashes


def test_whether_the_cache_is_read_or_recomputed_is_not_hashed(tmp_path):
    # both give the teacher outputs in the storage dtype (tests/test_cache.py): a speed choice, not a result
    default, _ = one(tmp_path, "method: kd\n", "a.yaml")
    for source in ("auto", "timed", "read", "recompute"):
        trial, _ = one(tmp_path, f"method: kd\nspeed: {{teacher_cache: {{source: {source}}}}}\n", f"{source}.yaml")
        assert trial.speed.teacher_cache.source == source and trial.cfg_hash == default.cfg_hash


def test_teacher_cache_precision_is_a_no_op_when_every_stage_uses_mixup(tmp_path):
    stage = "train: [{name: s1, mixup: true, losses: [{name: relation_kl, layer_map: last}]}]\n"
    a, _ = one(tmp_path, "method: custom\n" + stage, "a.yaml")
    b, _ = one(tmp_path, "method: custom\nspeed: {teacher_cache: {dtype: float32}}\n" + stage, "b.yaml")
    assert a.cfg_hash == b.cfg_hash


# ------------------------------------------------------------------------------------ data subsets
def test_subsample_seed_run_and_fixed_differ_only_when_something_is_drawn(tmp_path):
    run, _ = one(tmp_path, "method: kd\ndata: {max_train_examples: 100}\n", "a.yaml")
    fixed, _ = one(tmp_path, "method: kd\ndata: {max_train_examples: 100, subsample_seed: fixed}\n", "b.yaml")
    assert run.data.subsample_seed == "run"  # the default follows the CR-ILD reference
    assert run.cfg_hash != fixed.cfg_hash and run.teacher_hash != fixed.teacher_hash
    noisy, _ = one(tmp_path, "method: kd\ndata: {label_noise: 0.1}\n", "c.yaml")
    assert noisy.data.subsample_seed == "run"
    full, _ = one(tmp_path, "method: kd\n", "d.yaml")
    full_run, notes = one(tmp_path, "method: kd\ndata: {subsample_seed: run}\n", "e.yaml")
    assert full.cfg_hash == full_run.cfg_hash and full_run.data.subsample_seed == "fixed"
    assert "data.subsample_seed has no effect without max_train_examples or label_noise" in notes[0]


# --------------------------------------------------------------------------------- overrides
def test_conditional_overrides_set_values_for_matching_trials(tmp_path):
    _, trials, _ = trials_of(tmp_path, """
        method: kd
        overrides:
          - {when: {task: cola}, set: {data.max_seq_length: 64, train.pred.eval_every: 10}}
        grid: {task: [cola, rte]}
        """)
    by = {t.task: t for t in trials}
    assert (by["cola"].data.max_seq_length, by["cola"].train[0].eval_every) == (64, 10)
    assert (by["rte"].data.max_seq_length, by["rte"].train[0].eval_every) == (128, 50)


@pytest.mark.parametrize("overrides, path", [
    ("[{when: {task: cola}, set: {data.nope: 1}}]", "overrides[0]"),
    ("[{when: {task: cola}, set: {task: rte}}]", "overrides[0].set.task"),
    ("[{when: {task: cola}, set: {data.max_seq_length: 4}}]", "overrides[0].set.data.max_seq_length"),
    ("[{when: {task: colaa}, set: {data.max_seq_length: 64}}]", "overrides[0].when"),
])
def test_bad_overrides_are_refused_with_their_path(tmp_path, overrides, path):
    e = refused(tmp_path, f"method: kd\noverrides: {overrides}\ngrid: {{task: [cola, rte]}}\n")
    assert e.path.startswith(path), str(e)


# ------------------------------------------------------------------------------ stage settings no trial trains
def test_a_stage_setting_no_method_of_the_file_trains_is_noted_and_changes_no_hash(tmp_path):
    kd, _ = one(tmp_path, "method: kd\n", "plain.yaml")
    trial, notes = one(tmp_path, """\
        method: kd
        train:
          - {name: qat, eval_every: 50}
          - {name: pred, lr: 1.0e-4}
        """)
    assert notes == ["train[0] (stage 'qat') has no effect: none of this file's methods (kd) trains a stage 'qat'"]
    assert trial.train[0].lr == 1.0e-4  # the stage that runs still takes its setting
    _, same, _ = trials_of(tmp_path, "method: kd\ntrain:\n  - {name: pred, lr: 1.0e-4}\n", "pred_only.yaml")
    assert trial.cfg_hash == same[0].cfg_hash != kd.cfg_hash
    # a grid over methods where one of them trains the stage: no note
    _, _, grid_notes = trials_of(tmp_path, "grid: {method: [kd, cr_ild]}\ntrain:\n  - {name: ild, epochs: 2}\n",
                                 "grid.yaml")
    assert not [n for n in grid_notes if "has no effect: none of" in n]
