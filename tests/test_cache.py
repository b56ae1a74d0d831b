"""Teacher output cache: exact hits, reuse across epochs and trials, the size bound, damaged entries, mixup.

Small on purpose (a tiny random BERT, a few dozen examples): speed is measured in benchmarks/, never here.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from kdplatform.config import ResolvedLoss, ResolvedStage, TrialConfig, resolve_trial
from kdplatform.distill import objective
from kdplatform.distill import worker
from kdplatform.distill.objective import StageLosses
from kdplatform.distill.taps import forward_features
from kdplatform.distill.teacher_cache import (TIMED_READS, TeacherCache, cache_size, evict, extract,
                                               teacher_identity)
from kdplatform.distill.models import freeze, load_classifier
from kdplatform.distill.tasks import Collator

SENTENCES = ["a fine film", "the plot is thin and the acting is worse", "wonderful", "not good at all , sadly",
             "it drags", "an utterly charming , funny and moving story about two friends", "meh", "bold and new",
             "i would not watch it again even for free", "great cast", "dull", "the ending surprises"]

ALL_TERMS = [  # every kind of teacher feature: logits, hidden (incl. embeddings), q/k/v, attention output
    ResolvedLoss(name="logit_kd", weight=1.0, temperature=2.0),
    ResolvedLoss(name="hidden_mse", weight=1.0, layer_pairs=[(0, 0), (2, 4)]),
    ResolvedLoss(name="attention_kl", weight=1.0, layer_pairs=[(1, 2)]),
    ResolvedLoss(name="relation_kl", weight=1.0, layer_pairs=[(2, 4)], relations=["q", "k", "v"]),
    ResolvedLoss(name="attention_output_mse", weight=1.0, layer_pairs=[(2, 3)]),
]


def _stage(terms=ALL_TERMS, mixup=False) -> ResolvedStage:
    return ResolvedStage(name="distill", losses=terms, epochs=1, max_steps=None, lr=1e-4, batch_size=4,
                         warmup=0.0, weight_decay=0.0, max_grad_norm=1.0, eval_every=0, mixup=mixup)


@pytest.fixture(scope="module")
def models(tiny_bert_dir):
    teacher = freeze(load_classifier(str(tiny_bert_dir), 2))
    student = load_classifier(str(tiny_bert_dir), 2, num_layers=2)
    return teacher, student


@pytest.fixture(scope="module")
def examples(tiny_bert_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_bert_dir))
    enc = tok(SENTENCES, truncation=True, max_length=32)
    return [{"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i],
             "token_type_ids": enc["token_type_ids"][i], "label": i % 2} for i in range(len(SENTENCES))]


def _batches(examples, order, bs=4):
    collate = Collator(0, regression=False)
    return [collate([{**examples[i], "idx": i} for i in order[s:s + bs]]) for s in range(0, len(order), bs)]


def _open(examples, losses, teacher, root, **kw) -> TeacherCache:
    return TeacherCache.open(examples, features=losses.t_features, num_heads=teacher.config.num_attention_heads,
                             identity=teacher_identity(teacher.name_or_path), precision="fp32", max_seq_length=32,
                             root=root, **kw)


def _fill(cache, losses, teacher, examples, order) -> None:
    for b in _batches(examples, order):
        losses.teacher(teacher, b, cache=cache)


def _assert_same_features(got, want, mask) -> None:
    valid = mask.bool()
    assert torch.equal(got.logits, want.logits)
    for layer, h in enumerate(got.hidden or ()):
        if h is not None:
            assert torch.equal(h[valid], want.hidden[layer][valid]), f"hidden.{layer}"
    for kind in ("q", "k", "v", "attn_out"):
        for layer, t in getattr(got, kind).items():
            assert torch.equal(t[valid], getattr(want, kind)[layer][valid]), f"{kind}.{layer}"


def test_hit_returns_exactly_a_fresh_forward(models, examples, tmp_path):
    teacher, student = models
    losses = StageLosses(_stage(), student, teacher, n_student=2)
    assert losses.t_features == ["attn_out.3", "hidden.0", "hidden.4", "k.2", "k.4", "logits", "q.2", "q.4",
                                 "v.4"]
    order = list(range(len(examples)))
    first = _open(examples, losses, teacher, tmp_path)
    _fill(first, losses, teacher, examples, order)
    assert first.misses == len(examples) and first.hits == 0
    entry = tmp_path / first.key
    assert sorted(p.name for p in entry.glob("*.npy")) == sorted(["offsets.npy"] + [f"{n}.npy" for n in
                                                                                    losses.t_features])
    assert not list(entry.glob(".*partial"))

    second = _open(examples, losses, teacher, tmp_path)  # another trial: other batches, other padding
    assert set(second.ready) == set(losses.t_features)
    rng = np.random.default_rng(0)
    for b in _batches(examples, rng.permutation(len(examples)).tolist(), bs=5):
        hit = second.lookup(b)
        assert hit is not None
        fresh = forward_features(teacher, b, losses.t_tap, True)
        # values at valid positions equal the forward that wrote them; a fresh forward of another padding
        # differs only in float rounding
        for name in losses.t_features:
            got = extract(name, hit)
            want = extract(name, fresh)
            m = b["attention_mask"].bool() if got.dim() == 3 else slice(None)
            torch.testing.assert_close(got[m], want[m], rtol=1e-5, atol=1e-5)
        s = losses.student(student, b)
        torch.testing.assert_close(losses.weighted(losses.terms(s, hit, b["labels"])),
                                   losses.weighted(losses.terms(s, fresh, b["labels"])), rtol=1e-5, atol=1e-6)
    assert second.hits == len(examples) and second.misses == 0

    # same batch as the one written: bit for bit
    same = _open(examples, losses, teacher, tmp_path)
    b = _batches(examples, order)[1]
    _assert_same_features(same.lookup(b), forward_features(teacher, b, losses.t_tap, True),
                          b["attention_mask"])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_the_trial_filling_the_cache_computes_what_a_later_trial_reads(models, examples, tmp_path, dtype):
    # Otherwise the first trial of a sweep trains on full-precision teacher outputs and the others on rounded
    # ones, and a config's result depends on which trial ran first (seen: KD-QAT reruns in another order).
    teacher, student = models
    losses = StageLosses(_stage(), student, teacher, n_student=2)
    order = list(range(len(examples)))
    filling = _open(examples, losses, teacher, tmp_path, dtype=dtype)
    batches = _batches(examples, order)
    seen = [losses.teacher(teacher, b, cache=filling) for b in batches]
    reading = _open(examples, losses, teacher, tmp_path, dtype=dtype)
    assert set(reading.ready) == set(losses.t_features)
    for b, got in zip(batches, seen):
        read = reading.lookup(b)
        for name in losses.t_features:
            assert extract(name, got).dtype == extract(name, read).dtype, name
        _assert_same_features(read, got, b["attention_mask"])  # every cached feature, at valid positions
        s = losses.student(student, b)
        assert torch.equal(losses.weighted(losses.terms(s, got, b["labels"])),
                           losses.weighted(losses.terms(s, read, b["labels"])))


def test_a_complete_cache_times_reads_against_the_forward_and_keeps_the_faster(models, examples, tmp_path):
    teacher, student = models
    losses = StageLosses(_stage(), student, teacher, n_student=2)
    order = list(range(len(examples)))
    _fill(_open(examples, losses, teacher, tmp_path), losses, teacher, examples, order)
    cache = _open(examples, losses, teacher, tmp_path, source="timed")  # auto times on a GPU only
    assert cache.complete and cache.source is None
    calls = []

    def slow_forward(b):  # a teacher forward far slower than reading a few dozen cached rows
        calls.append(1)
        time.sleep(0.1)
        return forward_features(teacher, b, losses.t_tap, True)

    batches = _batches(examples, order, bs=2)  # 6 batches: TIMED_READS after one warm-up, then one more
    got = [cache.fetch(b, lambda b=b: slow_forward(b)) for b in batches]
    assert len(cache.timings) == TIMED_READS + 1 and len(calls) == TIMED_READS + 1  # the last batch was read
    assert cache.source == "read" and cache.forward_s > 0.1 > cache.read_s
    for b, g in zip(batches, got):
        _assert_same_features(g, cache.lookup(b), b["attention_mask"])
    assert cache.hits == 2 * len(examples) and cache.misses == 0


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_recomputing_gives_back_what_a_read_gives_and_writes_nothing(models, examples, tmp_path, dtype):
    teacher, student = models
    losses = StageLosses(_stage(), student, teacher, n_student=2)
    order = list(range(len(examples)))
    _fill(_open(examples, losses, teacher, tmp_path / "filled", dtype=dtype), losses, teacher, examples, order)
    reading = _open(examples, losses, teacher, tmp_path / "filled", dtype=dtype, source="read")
    recomputing = _open(examples, losses, teacher, tmp_path / "recomputed", dtype=dtype, source="recompute")
    for b in _batches(examples, order):
        got = recomputing.fetch(b, lambda b=b: forward_features(teacher, b, losses.t_tap, True))
        _assert_same_features(got, reading.fetch(b, lambda: pytest.fail("a complete cache read ran the teacher")),
                              b["attention_mask"])
        for name in losses.t_features:
            assert extract(name, got).dtype == extract(name, reading.lookup(b)).dtype, name
    assert recomputing.misses == len(examples) and recomputing.hits == 0 and not recomputing.timings
    assert not (tmp_path / "recomputed").exists()


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_a_cache_placed_on_the_device_reads_what_the_host_arrays_give(models, examples, tmp_path, dtype):
    # on a GPU a complete cache that fits moves into GPU memory; the same gather runs on the CPU device here
    teacher, student = models
    losses = StageLosses(_stage(), student, teacher, n_student=2)
    order = list(range(len(examples)))
    _fill(_open(examples, losses, teacher, tmp_path, dtype=dtype), losses, teacher, examples, order)
    host = _open(examples, losses, teacher, tmp_path, dtype=dtype)
    placed = _open(examples, losses, teacher, tmp_path, dtype=dtype)
    assert not placed.place(torch.device("cpu"), free_bytes=placed.bytes)  # needs 4x its size free: stays
    assert placed.place(torch.device("cpu"), free_bytes=4 * placed.bytes)
    rng = np.random.default_rng(1)
    for b in _batches(examples, rng.permutation(len(examples)).tolist(), bs=5):
        got, want = placed.lookup(b), host.lookup(b)
        for name in losses.t_features:
            g, w = extract(name, got), extract(name, want)
            assert g.dtype == w.dtype and torch.equal(g.view(torch.int16) if dtype == "bfloat16" else g,
                                                      w.view(torch.int16) if dtype == "bfloat16" else w), name
    placed.close()  # the end of a stage frees the device copy for the next stage or trial
    assert not placed.resident


def test_16bit_storage_is_close_and_half_the_bytes(models, examples, tmp_path):
    teacher, student = models
    losses = StageLosses(_stage(), student, teacher, n_student=2)
    order = list(range(len(examples)))
    c32 = _open(examples, losses, teacher, tmp_path)
    c16 = _open(examples, losses, teacher, tmp_path, dtype="bfloat16")
    assert c32.key != c16.key
    _fill(c32, losses, teacher, examples, order)
    _fill(c16, losses, teacher, examples, order)
    assert c16.bytes * 2 == c32.bytes
    b = _batches(examples, order)[0]
    torch.testing.assert_close(c16.lookup(b).hidden[4].float(), c32.lookup(b).hidden[4], rtol=1e-2, atol=1e-2)

    # float16 cannot hold |x| > 65504: such a feature is not cached (the teacher runs), the rest is
    big = _open(examples, losses, teacher, tmp_path / "big", dtype="float16")
    for batch in _batches(examples, order):
        feats = forward_features(teacher, batch, losses.t_tap, True)
        feats.hidden = tuple(h * 1e6 if i == 4 else h for i, h in enumerate(feats.hidden))
        big.store(batch, feats)
    assert "hidden.4" in big.skipped and "logits" in big.ready and big.lookup(b) is None
    assert not (tmp_path / "big" / big.key / "hidden.4.npy").exists()


def test_eviction_keeps_the_bound(models, examples, tmp_path):
    teacher, student = models
    losses = StageLosses(_stage(ALL_TERMS[:2]), student, teacher, n_student=2)
    order = list(range(len(examples)))
    sizes = []
    for n in (6, 8, 10):  # three example sets: three entries
        c = _open(examples[:n], losses, teacher, tmp_path)  # noqa: F841
        _fill(c, losses, teacher, examples[:n], order[:n])
        sizes.append(cache_size(tmp_path))
        os.utime(tmp_path / c.key / "last_used", (n, n))  # older entries were used longer ago
    one = sizes[0]
    assert len(list(tmp_path.iterdir())) == 3
    bound = cache_size(tmp_path) - 1
    removed = evict(tmp_path, bound)
    assert len(removed) == 1 and cache_size(tmp_path) <= bound  # the least recently used (6 examples) went
    assert not any(p.name == removed[0] for p in tmp_path.iterdir())

    # a cache with a bound writes within it, evicting older entries first
    scratch = _open(examples, losses, teacher, tmp_path / "scratch")
    _fill(scratch, losses, teacher, examples, order)
    full = cache_size(tmp_path / "scratch")
    assert full > one
    c = _open(examples, losses, teacher, tmp_path, max_bytes=full + one // 2)
    _fill(c, losses, teacher, examples, order)
    assert cache_size(tmp_path) <= full + one // 2
    assert (tmp_path / c.key).is_dir() and set(c.ready) == set(losses.t_features)

    # an entry that alone exceeds the bound is not written: the run recomputes
    tiny = _open(examples, losses, teacher, tmp_path / "small", max_bytes=1000)
    _fill(tiny, losses, teacher, examples, order)
    assert tiny.lookup(_batches(examples, order)[0]) is None and cache_size(tmp_path / "small") <= 1000


def test_damaged_entries_are_ignored_and_rebuilt(models, examples, tmp_path):
    teacher, student = models
    losses = StageLosses(_stage(ALL_TERMS[:2]), student, teacher, n_student=2)
    order = list(range(len(examples)))
    good = _open(examples, losses, teacher, tmp_path)
    _fill(good, losses, teacher, examples, order)
    entry = tmp_path / good.key
    b = _batches(examples, order)[0]
    want = forward_features(teacher, b, losses.t_tap, True)

    # a truncated feature file, a garbage one, and a writer's leftover partial (dead pid)
    data = (entry / "hidden.4.npy").read_bytes()
    (entry / "hidden.4.npy").write_bytes(data[:len(data) // 2])
    (entry / "logits.npy").write_bytes(b"not a numpy file")
    (entry / f".hidden.0.{os.uname().nodename}.999999999.partial").write_bytes(b"x" * 100)
    c = _open(examples, losses, teacher, tmp_path)
    assert set(c.ready) == {"hidden.0"}  # only the intact file is used
    assert not list(entry.glob(".*partial"))
    assert c.lookup(b) is None
    _fill(c, losses, teacher, examples, order)  # rebuilt
    assert set(c.ready) == set(losses.t_features)
    _assert_same_features(_open(examples, losses, teacher, tmp_path).lookup(b), want, b["attention_mask"])

    # wrong offsets (another example set under this key): the entry starts over
    np.save(entry / "offsets.npy", np.arange(3, dtype=np.int64))
    c = _open(examples, losses, teacher, tmp_path)
    assert not c.ready and not (entry / "logits.npy").exists()

    # a partial fill (stage ended early) never becomes readable and leaves no file
    part = _open(examples, losses, teacher, tmp_path)
    _fill(part, losses, teacher, examples, order[:4])
    part.close()
    assert not list(entry.glob("*.npy.*")) and not list(entry.glob(".*partial"))
    assert not _open(examples, losses, teacher, tmp_path).ready


# ------------------------------------------------------------------------------------------ whole trials
TRIAL = dict(name="cache", task="sst2", method="custom",
             teacher=dict(finetune=dict(epochs=1, max_steps=2, batch_size=16, lr=1e-3)),
             student=dict(init="truncate", layers=2))


def _trial(glue_dir, teacher_dir, **kw):
    # one subset for every seed (subsample_seed: fixed), so trials of other seeds share the cached examples
    raw = {**TRIAL, "data": dict(source="glue_dir", glue_dir=str(glue_dir), max_train_examples=48,
                                 max_dev_examples=32, train_eval_examples=16, max_seq_length=32,
                                 subsample_seed="fixed")}
    raw["teacher"] = {**raw["teacher"], "model": str(teacher_dir)}
    raw["train"] = [dict(name="distill", epochs=2, batch_size=16, eval_every=0, lr=1e-3,
                         losses=[dict(name="logit_kd"), dict(name="hidden_mse", layer_map="last"),
                                 dict(name="attention_kl", layer_map="last")])]
    raw.update(kw)
    return resolve_trial(TrialConfig.model_validate(raw))


def _history(uri, run_id, key):
    from mlflow.tracking import MlflowClient

    return [(m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key)]


@pytest.fixture(scope="module")
def trial_cache_dir(tmp_path_factory) -> Path:
    """One KDP_CACHE_DIR for the whole-trial tests: the tiny teacher is fine-tuned once."""
    return tmp_path_factory.mktemp("trial_cache")


@pytest.mark.slow
def test_run_trial_same_losses_with_and_without_cache(glue_dir, tiny_bert_dir, mlflow_uri, trial_cache_dir,
                                                      monkeypatch):
    monkeypatch.setenv("KDP_CACHE_DIR", str(trial_cache_dir))
    off = worker.run_trial(_trial(glue_dir, tiny_bert_dir, speed={"precision": "fp32",
                                                                 "teacher_cache": {"enabled": False}}),
                           tracking_uri=mlflow_uri)
    exact = {"precision": "fp32", "teacher_cache": {"dtype": "float32"}}  # float32 storage: bit-exact reads
    on = worker.run_trial(_trial(glue_dir, tiny_bert_dir, speed=exact), tracking_uri=mlflow_uri)
    for key in ("loss/total", "loss/logit_kd", "loss/hidden_mse", "loss/attention_kl", "dev/distill_loss",
                "train/distill_loss", "dev/accuracy"):
        a, b = _history(mlflow_uri, off.run_id, key), _history(mlflow_uri, on.run_id, key)
        assert [s for s, _ in a] == [s for s, _ in b] and len(a) == 2
        np.testing.assert_allclose([v for _, v in a], [v for _, v in b], rtol=1e-4, atol=1e-6, err_msg=key)
    # epoch 1 computed the 48 train examples and the 16 + 32 eval examples once; epoch 2 read them all
    assert _history(mlflow_uri, on.run_id, "cache/misses") == [(3, 96.0), (6, 96.0)]
    assert _history(mlflow_uri, on.run_id, "cache/hits") == [(3, 0.0), (6, 96.0)]
    assert _history(mlflow_uri, on.run_id, "cache/bytes")[-1][1] > 0
    assert _history(mlflow_uri, on.run_id, "cache/read_ms") == []  # auto on a CPU reads without timing

    # a second trial of the sweep (another seed and lr): every teacher output comes from the cache
    read = {**exact, "teacher_cache": {"dtype": "float32", "source": "read"}}
    again = worker.run_trial(_trial(glue_dir, tiny_bert_dir, seed=7, speed=read), tracking_uri=mlflow_uri)
    assert _history(mlflow_uri, again.run_id, "cache/misses")[-1][1] == 0
    assert _history(mlflow_uri, again.run_id, "cache/hits")[-1][1] == 2 * 96

    # timed (the default on a GPU): a complete cache times reads against the teacher forward, logs its choice
    timing = {**exact, "teacher_cache": {"dtype": "float32", "source": "timed"}}
    timed = worker.run_trial(_trial(glue_dir, tiny_bert_dir, seed=7, speed=timing), tracking_uri=mlflow_uri)
    (_, read_ms), = _history(mlflow_uri, timed.run_id, "cache/read_ms")  # decided in epoch 2 (6 train batches)
    (_, forward_ms), = _history(mlflow_uri, timed.run_id, "cache/forward_ms")
    (_, recompute), = _history(mlflow_uri, timed.run_id, "cache/recompute")
    assert read_ms > 0 and forward_ms > 0 and recompute == float(read_ms > forward_ms)
    for key in ("loss/total", "dev/distill_loss", "dev/accuracy"):  # the choice changes speed, not results
        a, b = _history(mlflow_uri, timed.run_id, key), _history(mlflow_uri, again.run_id, key)
        np.testing.assert_allclose([v for _, v in a], [v for _, v in b], rtol=1e-4, atol=1e-6, err_msg=key)

    # recompute: the teacher runs every batch and the trial computes what the cache-less run computed
    recompute = {"precision": "fp32", "teacher_cache": {"dtype": "float32", "source": "recompute"}}
    fresh = worker.run_trial(_trial(glue_dir, tiny_bert_dir, speed=recompute), tracking_uri=mlflow_uri)
    assert _history(mlflow_uri, fresh.run_id, "cache/hits")[-1][1] == 0
    for key in ("loss/total", "dev/distill_loss", "dev/accuracy"):
        np.testing.assert_allclose([v for _, v in _history(mlflow_uri, fresh.run_id, key)],
                                   [v for _, v in _history(mlflow_uri, off.run_id, key)], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_mixup_stages_bypass_the_cache(glue_dir, tiny_bert_dir, mlflow_uri, trial_cache_dir, monkeypatch):
    monkeypatch.setenv("KDP_CACHE_DIR", str(trial_cache_dir))
    seen = []
    real = objective.step_terms

    def spy(stage, *args, cache=None, **kw):
        seen.append((stage.name, cache is None))
        return real(stage, *args, cache=cache, **kw)

    monkeypatch.setattr(objective, "step_terms", spy)
    trial = _trial(glue_dir, tiny_bert_dir, method="cr_ild", consistency_weight=0.5,
                   # ramp: step, since two steps are one epoch, where the paper's epoch ramp is 0 (refused)
                   train=[dict(name="ild", max_steps=2, batch_size=16, eval_every=0, consistency={"ramp": "step"}),
                          dict(name="pred", max_steps=2, batch_size=16, eval_every=0)],
                   speed={"precision": "fp32"})
    worker.run_trial(trial, tracking_uri=mlflow_uri)
    assert [x for x in seen if x[0] != "finetune"] == [("ild", True), ("ild", True), ("pred", False),
                                                       ("pred", False)]
