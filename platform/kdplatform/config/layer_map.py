"""Layer mappings as data: which student layer is matched to which teacher layer.

Layers are 1-based (layer 0 is the embedding output, used only by hidden-state losses with
`include_embeddings`). A spec is one of:

- ``"uniform"``: student layer i -> teacher layer round(i * L_t / L_s), i = 1..L_s (PKD/TinyBERT);
- ``"last"``: only the last student layer -> the last teacher layer (CR-ILD, MiniLMv2);
- a list of teacher layers, one per student layer, e.g. ``[2, 4, 6]`` or the string ``"2,4,6"``;
- explicit pairs ``"student:teacher"``, e.g. ``"1:3,2:6"`` (a subset of student layers).

A trial's map is hashed in one spelling per mapping (`canonical_layer_map`): ``[3, 6]`` on a 2-layer student
of a 6-layer teacher is ``"uniform"``.

>>> resolve_layer_map("uniform", n_student=2, n_teacher=6)
[(1, 3), (2, 6)]
>>> resolve_layer_map("last", 2, 6)
[(2, 6)]
>>> resolve_layer_map("2:6", 2, 6)
[(2, 6)]
"""

from __future__ import annotations

import math

LayerMapSpec = str | list[int]


class LayerMapError(ValueError):
    """A layer map that does not fit the two models; the message says which side is wrong."""


def _parse(spec: LayerMapSpec, n_student: int) -> list[tuple[int, int]]:
    if isinstance(spec, list):
        items: list[str] = [str(x) for x in spec]
    else:
        items = [s.strip() for s in str(spec).split(",") if s.strip()]
    if not items:
        raise LayerMapError("empty layer map; use 'uniform', 'last', a list of teacher layers or 's:t' pairs")
    if all(":" in s for s in items):
        pairs = []
        for s in items:
            a, b = s.split(":", 1)
            try:
                pairs.append((int(a), int(b)))
            except ValueError:
                raise LayerMapError(f"'{s}' is not a 'student:teacher' pair of integers") from None
        return pairs
    if any(":" in s for s in items):
        raise LayerMapError("mix of 's:t' pairs and plain teacher layers; use one form")
    try:
        teacher_layers = [int(s) for s in items]
    except ValueError:
        raise LayerMapError(f"'{spec}' is neither 'uniform', 'last', a list of teacher layers nor 's:t' pairs") \
            from None
    if len(teacher_layers) != n_student:
        raise LayerMapError(f"a list of teacher layers needs one entry per student layer: got "
                            f"{len(teacher_layers)}, the student has {n_student}")
    return list(zip(range(1, n_student + 1), teacher_layers))


def resolve_layer_map(spec: LayerMapSpec, n_student: int, n_teacher: int) -> list[tuple[int, int]]:
    """Turn a mapping spec into (student_layer, teacher_layer) pairs, checked against both depths."""
    if spec == "uniform":
        if n_student > n_teacher:
            raise LayerMapError(f"uniform mapping needs a student no deeper than the teacher "
                                f"(student {n_student}, teacher {n_teacher} layers)")
        # round half up (Python's round() would send ties to the even layer)
        return [(i, math.floor(i * n_teacher / n_student + 0.5)) for i in range(1, n_student + 1)]
    if spec == "last":
        return [(n_student, n_teacher)]
    pairs = _parse(spec, n_student)
    for s, t in pairs:
        if not 1 <= s <= n_student:
            raise LayerMapError(f"student layer {s} does not exist: the student has layers 1..{n_student}")
        if not 1 <= t <= n_teacher:
            raise LayerMapError(f"teacher layer {t} does not exist: the teacher has layers 1..{n_teacher}")
    if len({s for s, _ in pairs}) != len(pairs):
        raise LayerMapError("a student layer appears twice in the layer map")
    return pairs


NAMED_MAPS = ("uniform", "last")  # in order of preference when both give the same pairs (a 1-layer student)


def canonical_layer_map(spec: LayerMapSpec, n_student: int, n_teacher: int) -> LayerMapSpec:
    """One spelling per mapping of these two depths.

    Why: the config hash is of the spelling, and the grid collapses trials by hash, so `[3, 6]`, `"3,6"`,
    `"1:3,2:6"` and `"2:6, 1:3"` (all 'uniform' on a 2-layer student of a 6-layer teacher) would be four
    trials with four hashes that compute the same thing. Rules, chosen so that no trial already written in
    the canonical spelling changes its hash (MLflow stores dedupe finished runs by it):

    - 'uniform' and 'last' are kept as written;
    - an explicit map with the pairs of 'uniform' (else of 'last') becomes that name;
    - any other explicit map: the list of teacher layers when it maps every student layer, else the
      's:t' pairs without spaces; in both, pairs ordered by student layer (the order they are written in
      means nothing: each student layer appears once).

    A map that does not fit the two models is returned as written: resolving it raises the error.

    >>> canonical_layer_map([3, 6], 2, 6), canonical_layer_map("2:6", 2, 6)
    ('uniform', 'last')
    >>> canonical_layer_map("2, 6", 2, 6), canonical_layer_map("2:5 ,1:1", 2, 6)
    ([2, 6], [1, 5])
    >>> canonical_layer_map("1:2", 2, 6), canonical_layer_map("1:9", 2, 6)
    ('1:2', '1:9')
    """
    if isinstance(spec, str) and spec in NAMED_MAPS:
        return spec
    try:
        pairs = sorted(resolve_layer_map(spec, n_student, n_teacher))
    except LayerMapError:
        return spec
    for name in NAMED_MAPS:
        try:
            if pairs == resolve_layer_map(name, n_student, n_teacher):
                return name
        except LayerMapError:  # 'uniform' with a student deeper than the teacher
            continue
    if [s for s, _ in pairs] == list(range(1, n_student + 1)):
        return [t for _, t in pairs]
    return ",".join(f"{s}:{t}" for s, t in pairs)


def with_embeddings(pairs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Prepend the embedding-output pair (0, 0) used by hidden-state losses (TinyBERT, KD-QAT 'rep')."""
    return [(0, 0)] + [p for p in pairs if p != (0, 0)]


def layer_map_label(spec: LayerMapSpec | None) -> str:
    """A short label for run names: 'uniform', 'last', '2-4-6', '1:3-2:6'."""
    if spec is None:
        return "-"
    if isinstance(spec, list):
        return "-".join(str(x) for x in spec)
    return str(spec).replace(",", "-").replace(" ", "")
