"""Hostile and oversized inputs are refused within seconds using little memory, and values that used to pass
validation and crash later (or be silently ignored) are refused or collapsed with a note.

Every size case runs a real `kdplatform run FILE --dry-run` process and measures its CPU time and peak
resident memory (`os.wait4` of that one process, forked by a small fresh Python). CPU time, not wall time, is held to the 5 s
bound: it is the work the refusal costs, and it does not grow when other jobs share the cores (wall time
only has a loose bound that catches a hang). Each child also runs under an address-space cap,
so a regression fails here instead of swapping the machine (the alias bomb once took ~7 GB).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from kdplatform.config import ConfigError, load_trials
from kdplatform.config.schema import MAX_TRIALS_LIMIT
from kdplatform.config.yaml_io import MAX_FILE_BYTES, MAX_YAML_VALUES

GUARD_BYTES = 3 * 1024**3  # the child's address space: far above a refusal's needs, far below a bomb's


# The measured process is started by a small fresh Python that forks it and reports its rusage: a child
# forked straight from pytest would count pytest's own resident memory at fork time in its ru_maxrss
# (Linux carries the pre-exec high-water mark over), and pytest is large after the model tests.
MEASURE = """
import os, resource, sys
pid = os.fork()
if pid == 0:
    resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[1]), int(sys.argv[1])))
    os.execv(sys.argv[3], sys.argv[3:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[2], "w") as f:
    f.write(f"{usage.ru_utime + usage.ru_stime} {usage.ru_maxrss}")
sys.exit(os.waitstatus_to_exitcode(status))
"""


def measured_run(args: list[str], cwd: Path) -> tuple[int, str, float, float, float]:
    """(exit code, stderr, wall seconds, CPU seconds, peak RSS in MB) of one `kdplatform` process."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'm.db'}", "HF_HUB_OFFLINE": "1"}
    out, err, usage = cwd / "stdout.txt", cwd / "stderr.txt", cwd / "usage.txt"
    command = [sys.executable, "-c", MEASURE, str(GUARD_BYTES), str(usage), sys.executable, "-m",
               "kdplatform.cli", *args]
    with out.open("wb") as o, err.open("wb") as e:
        start = time.monotonic()
        rc = subprocess.run(command, cwd=cwd, env=env, stdout=o, stderr=e, timeout=600).returncode
        seconds = time.monotonic() - start
    cpu, maxrss_kb = usage.read_text().split()
    return rc, err.read_text(), seconds, float(cpu), int(maxrss_kb) / 1024  # Linux: ru_maxrss in kB


def alias_bomb(levels: int = 9, width: int = 9, use: str = "seeds") -> str:
    lines = [f"a0: &a0 [{', '.join(['1'] * width)}]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]" for i in range(1, levels + 1)]
    return "\n".join(lines) + f"\n{use}: *a{levels}\n"


def refused_fast(tmp_path: Path, name: str, fragment: str, seconds: float = 5.0, mb: float = 500.0) -> tuple:
    rc, stderr, wall, took, peak = measured_run(["run", name, "--dry-run"], tmp_path)
    assert rc == 2, stderr
    assert fragment in stderr and name in stderr, stderr
    assert "Traceback" not in stderr
    assert took < seconds, f"{name}: {took:.1f} s of CPU"
    assert wall < 30 * seconds, f"{name}: {wall:.1f} s wall"  # only a hang guard
    assert peak < mb, f"{name}: {peak:.0f} MB"
    assert not (tmp_path / "m.db").exists()
    print(f"{name}: exit 2 in {took:.2f} s of CPU ({wall:.2f} s wall), peak RSS {peak:.0f} MB")
    return took, peak


# ------------------------------------------------------------------------------------------- sizes
@pytest.mark.slow
def test_alias_bomb_is_refused_within_5_s_and_500_mb(tmp_path):
    (tmp_path / "bomb.yaml").write_text(alias_bomb(9, 9))  # 9^9 = 387 million values once expanded
    refused_fast(tmp_path, "bomb.yaml", f"more than {MAX_YAML_VALUES} values", 5.0, 500.0)


@pytest.mark.slow
def test_alias_bomb_inside_the_grid_is_refused_too(tmp_path):
    (tmp_path / "bomb.yaml").write_text(alias_bomb(7, 12, use="grid"))
    refused_fast(tmp_path, "bomb.yaml", "aliases")


@pytest.mark.slow
def test_a_55_mb_seeds_list_is_refused_before_it_is_read(tmp_path):
    with (tmp_path / "seeds.yaml").open("w") as f:
        f.write("seeds: [")
        chunk = ", ".join(str(i) for i in range(100_000)) + ", "
        while f.tell() < 55_000_000:
            f.write(chunk)
        f.write("1]\n")
    refused_fast(tmp_path, "seeds.yaml", f"over the limit of {MAX_FILE_BYTES:,} bytes")


@pytest.mark.slow
def test_two_million_grid_keys_are_refused_before_they_are_read(tmp_path):
    with (tmp_path / "keys.yaml").open("w") as f:
        f.write("grid:\n")
        f.writelines(f"  k{i}: [1]\n" for i in range(2_000_000))
    refused_fast(tmp_path, "keys.yaml", "bytes, over the limit")


@pytest.mark.slow
def test_a_long_seeds_list_under_the_file_limit_is_refused_by_the_trial_count(tmp_path):
    (tmp_path / "seeds.yaml").write_text(f"seeds: [{', '.join(str(i) for i in range(30_000))}]\n")
    assert (tmp_path / "seeds.yaml").stat().st_size < MAX_FILE_BYTES
    refused_fast(tmp_path, "seeds.yaml", "the grid expands to 30000 trials, over max_trials=5000")


@pytest.mark.slow
def test_the_grid_size_is_checked_before_anything_is_expanded(tmp_path):
    axes = {"data.max_train_examples": 100, "data.max_dev_examples": 100, "train.pred.epochs": 100,
            "train.pred.batch_size": 100}  # 10^8 combinations
    grid = "\n".join(f"  {k}: [{', '.join(str(v) for v in range(1, n + 1))}]" for k, n in axes.items())
    (tmp_path / "grid.yaml").write_text(f"max_trials: {MAX_TRIALS_LIMIT}\ngrid:\n{grid}\n")
    refused_fast(tmp_path, "grid.yaml", "the grid expands to 100000000 trials")


def test_aliases_within_the_limit_still_work(tmp_path):
    p = tmp_path / "ok.yaml"
    p.write_text(textwrap.dedent("""\
        method: tinybert
        teacher: {model: minilm-l6}
        student: {layers: 2}
        train:
          - &stage {name: ild, epochs: 1, batch_size: 16}
          - {<<: *stage, name: pred}
        """))
    _, trials, _ = load_trials(p)
    assert [(s.name, s.epochs, s.batch_size) for s in trials[0].train] == [("ild", 1, 16), ("pred", 1, 16)]


# ------------------------------------------------------------------------- values that crashed later
BASE = "teacher: {model: minilm-l6}\nstudent: {layers: 2}\n"


def refused(tmp_path: Path, text: str, *fragments: str) -> ConfigError:
    p = tmp_path / "f.yaml"
    p.write_text(BASE + textwrap.dedent(text))
    with pytest.raises(ConfigError) as e:
        load_trials(p)
    for fragment in fragments:
        assert fragment in str(e.value), str(e.value)
    return e.value


@pytest.mark.parametrize("text, path", [("seeds: [-1]", "seeds[0]"), ("seeds: [4294967296]", "seeds[0]"),
                                        ("teacher: {model: minilm-l6, seed: -5}", "teacher.seed"),
                                        ("seed: 4294967296", "seed")])
def test_seeds_outside_numpys_range_are_refused(tmp_path, text, path):
    p = tmp_path / "f.yaml"
    p.write_text("student: {layers: 2}\n" + text + "\n")
    with pytest.raises(ConfigError) as e:
        load_trials(p)
    assert e.value.path == path


def test_the_largest_numpy_seed_is_accepted(tmp_path):
    p = tmp_path / "f.yaml"
    p.write_text(BASE + "seeds: [0, 4294967295]\n")
    assert sorted(t.seed for t in load_trials(p)[1]) == [0, 2**32 - 1]


def test_a_lone_seed_is_the_trials_seed_and_seed_with_seeds_is_refused(tmp_path):
    p = tmp_path / "f.yaml"
    p.write_text(BASE + "seed: 7\n")
    assert [t.seed for t in load_trials(p)[1]] == [7]  # it used to run seed 42 and ignore this
    refused(tmp_path, "seed: 7\nseeds: [1]\n", "seed: both seed and seeds are set")


@pytest.mark.parametrize("name", ["x" * 251, "exp[/]", "[bold]x", "a'b", "two\nlines", "-flag", "tab\tname"])
def test_experiment_names_that_break_printing_or_mlflow_are_refused(tmp_path, name):
    p = tmp_path / "f.yaml"
    p.write_text(BASE + yaml.safe_dump({"name": name}))
    with pytest.raises(ConfigError) as e:
        load_trials(p)
    assert e.value.path == "name"


@pytest.mark.parametrize("name", ["glue 2026-11 (cpu)", "kd-qat/bert_base", "Ablation: w=0.5, T=2", "élève"])
def test_ordinary_experiment_names_are_accepted(tmp_path, name):
    p = tmp_path / "f.yaml"
    p.write_text(BASE + yaml.safe_dump({"name": name}, allow_unicode=True))
    assert load_trials(p)[0].name == name


def test_layer_map_booleans_and_floats_are_refused_not_read_as_layers(tmp_path):
    refused(tmp_path, "method: tinybert\nlayer_map: [true, 6]\n", "layer_map:", "boolean")
    refused(tmp_path, "method: tinybert\nlayer_map: [3.0, 6]\n", "layer_map[0]:", "valid integer")
    refused(tmp_path, "method: tinybert\ntrain:\n  - name: ild\n    losses: [{name: hidden_mse, layer_map: "
                      "[false, 6]}]\n", "train[0].losses[0].layer_map", "boolean")


def test_unquoted_student_teacher_pairs_are_not_read_as_base_60_numbers(tmp_path):
    """YAML 1.1 reads `1:6` as 66 (base 60); the loader reads it as the text a layer map means."""
    p = tmp_path / "f.yaml"
    p.write_text(BASE + "method: tinybert\nlayer_map: 1:3,2:6\ngrid: {train.pred.lr: [1e-4]}\n")
    trial = load_trials(p)[1][0]
    assert trial.train[0].losses[0].layer_pairs[-2:] == [(1, 3), (2, 6)]
    assert trial.train[1].lr == 1e-4  # and 1e-4 is the number, as YAML 1.2 reads it


def test_on_for_a_number_is_refused(tmp_path):
    refused(tmp_path, "data: {max_train_examples: on}\n", "data.max_train_examples",
            "boolean")


def test_infinite_or_nan_values_are_refused(tmp_path):
    refused(tmp_path, "train: [{name: pred, lr: .inf}]\n", "train[0].lr", "finite number")
    refused(tmp_path, "data: {label_noise: .nan}\n", "data.label_noise")


@pytest.mark.parametrize("key", ["name", "tracking_uri"])
def test_a_grid_over_the_experiment_or_the_store_is_refused(tmp_path, key):
    err = refused(tmp_path, f"grid: {{{key}: [a, b]}}\n", "not a grid axis")
    assert err.path == f"grid.{key}"


def test_a_grid_axis_over_a_stage_the_method_lacks_collapses_with_a_note_and_no_label(tmp_path):
    p = tmp_path / "f.yaml"
    p.write_text(BASE + "method: kd\ngrid: {train.qat.lr: [1.0e-4, 2.0e-4]}\n")
    _, trials, notes = load_trials(p)
    assert len(trials) == 1 and "train.qat" not in trials[0].run_name
    assert any("train.qat.lr has no effect on method kd (no stage 'qat'" in n for n in notes), notes


def test_a_stage_axis_labels_only_the_methods_that_train_that_stage(tmp_path):
    p = tmp_path / "f.yaml"
    p.write_text(BASE + "bits: 2\ngrid: {method: [kd, ternarybert], train.qat.lr: [1.0e-4, 2.0e-4]}\n")
    _, trials, notes = load_trials(p)
    names = sorted(t.run_name for t in trials)
    assert names == ["sst2/kd/b2/s42", "sst2/ternarybert/uniform/b2/s42/train.qat.lr=0.0001",
                     "sst2/ternarybert/uniform/b2/s42/train.qat.lr=0.0002"], names
    assert sorted(t.train[0].lr for t in trials if t.method == "ternarybert") == [1e-4, 2e-4]


def test_a_normalised_axis_does_not_label_the_run(tmp_path):
    """student.two_bit has no effect at 4 bits: the trials collapse and the run name does not carry it."""
    p = tmp_path / "f.yaml"
    p.write_text(BASE + "bits: 4\ngrid: {student.two_bit: [ternary, uniform]}\n")
    _, trials, notes = load_trials(p)
    assert len(trials) == 1 and "two_bit" not in trials[0].run_name
    assert any("student.two_bit has no effect" in n for n in notes)


@pytest.mark.parametrize("text, path", [("teacher: {model: " + "a" * 300 + "}", "teacher.model"),
                                        ("student: {init: " + "a/" * 2100 + "}", "student.init"),
                                        ('data: {glue_dir: "glue\\0x"}', "data.glue_dir")])
def test_paths_the_file_system_cannot_take_are_refused(tmp_path, text, path):
    p = tmp_path / "f.yaml"
    p.write_text(text + "\n")
    with pytest.raises(ConfigError) as e:
        load_trials(p)
    assert e.value.path == path


def test_conditional_overrides_are_bounded(tmp_path):
    entries = "".join(f"  - {{when: {{seed: {i}}}, set: {{data.max_seq_length: 64}}}}\n" for i in range(201))
    refused(tmp_path, "overrides:\n" + entries, "overrides", "at most 200")
