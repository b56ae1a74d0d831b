"""Apply a method preset to a validated trial: stages, loss terms with their layer pairs, depths, axes.

`resolve_trial(cfg)` gives the ResolvedTrial the worker runs; `resolve_with_notes` also returns what was
normalised (settings that have no effect in this trial). Impossible combinations raise ConfigError naming
the setting and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kdplatform.config.errors import ConfigError
from kdplatform.config.layer_map import LayerMapError, canonical_layer_map, resolve_layer_map, with_embeddings
from kdplatform.config.models import MODEL_ALIASES, model_depth, model_family
from kdplatform.config.normalise import normalise_no_ops
from kdplatform.config.presets import (DEFAULT_CONSISTENCY_WEIGHT, PRESETS, STAGE_DEFAULTS, Preset,
                                       StageTemplate)
from kdplatform.config.schema import (REGRESSION_TASKS, ConsistencyConfig, LossTermConfig, StageConfig,
                                      TrialConfig)
from kdplatform.config.trial import ResolvedConsistency, ResolvedLoss, ResolvedStage, ResolvedTrial
from kdplatform.families import UnsupportedFamily
from kdplatform.loss_menu import LOSS_MENU

STAGE_FIELDS = ("epochs", "max_steps", "lr", "batch_size", "warmup", "weight_decay", "max_grad_norm", "eval_every")


@dataclass(frozen=True)
class _Context:
    """What every stage of one trial resolves against."""

    cfg: TrialConfig
    file: str | None
    where: str
    s_layers: int
    t_layers: int
    layer_map: Any
    consistency_weight: float | None
    coeffs: tuple[float | None, float | None]
    notes: list[str]  # settings normalised because they have no effect (appended to while resolving)


def resolve_trial(cfg: TrialConfig, where: str = "", file: str | None = None) -> ResolvedTrial:
    """Apply the method preset to a validated trial; ConfigError on impossible combinations."""
    return resolve_with_notes(cfg, where, file)[0]


def resolve_with_notes(cfg: TrialConfig, where: str = "", file: str | None = None
                       ) -> tuple[ResolvedTrial, list[str]]:
    """The resolved trial and a note per setting that has no effect in it (normalised to its default)."""
    preset = PRESETS[cfg.method]
    cfg, notes = normalise_no_ops(cfg, preset)
    if cfg.data.label_noise > 0 and cfg.task in REGRESSION_TASKS:
        raise ConfigError(file, f"{where}data.label_noise", "label noise flips a label to another class, but "
                          f"{cfg.task} is a regression task (no classes)", f"set data.label_noise: 0 for {cfg.task}")
    if cfg.data.hub_dataset and cfg.data.source == "glue_dir":  # hub_dataset would win and the folder go unread
        raise ConfigError(file, f"{where}data.source", "'glue_dir' says read the GLUE folder, but data.hub_dataset "
                          f"names another dataset ({cfg.data.hub_dataset}), which would be read instead",
                          "drop data.hub_dataset to read the folder, or set data.source: auto to read hub_dataset")
    if cfg.data.glue_dir and cfg.data.source == "hub":  # the hub would be read and the folder go unread
        raise ConfigError(file, f"{where}data.glue_dir", f"data.source 'hub' reads the GLUE hub dataset, so the "
                          f"folder {cfg.data.glue_dir} would never be read",
                          "drop data.glue_dir to read the hub, or set data.source: glue_dir (or auto) to read it")
    s_layers, t_layers = _depths(cfg, where, file)
    _check_families(cfg, where, file)
    layer_map, cw, coeffs = _axes(cfg, preset, notes)
    written = layer_map
    if layer_map is not None:  # equal mappings hash equal: see canonical_layer_map
        layer_map = canonical_layer_map(layer_map, s_layers, t_layers)
    ctx = _Context(cfg, file, where, s_layers, t_layers, layer_map, cw, coeffs, notes)
    stages = [_resolve_stage(ctx, name, tpl, ov) for name, tpl, ov in _stage_plan(cfg, preset, where, file)]
    uses_map = any(t.layer_map is not None and t.layer_map == _label(layer_map) for s in stages for t in s.losses)
    if cfg.layer_map is not None and layer_map is not None and not uses_map:
        notes.append(f"layer_map has no effect on method {cfg.method} (its terms do not take the trial's map)")
    elif uses_map and layer_map != written:
        notes.append(_respelled("layer_map", written, layer_map, s_layers, t_layers))
    trial = ResolvedTrial(
        name=cfg.name, tracking_uri=cfg.tracking_uri, task=cfg.task, method=cfg.method,
        layer_map=layer_map if uses_map else None, consistency_weight=cw, bits=cfg.bits, act_bits=cfg.act_bits,
        map_coeff=coeffs[0], output_coeff=coeffs[1], seed=cfg.seed, data=cfg.data, teacher=cfg.teacher,
        student=cfg.student, student_layers=s_layers, teacher_layers=t_layers, train=stages, speed=cfg.speed,
        output=cfg.output)
    return trial, notes


def _check_families(cfg: TrialConfig, where: str, file: str | None) -> None:
    """Activation quantization is refused (one line) where the student's attention does not pass through
    transformers' attention interface. (A model of a family outside the table was refused by `_depths`.)"""
    init = cfg.student.init
    student = cfg.teacher.checkpoint or cfg.teacher.model if init in ("truncate", "teacher_copy") else init
    family = model_family(student)
    if cfg.act_bits < 32 and family is not None and not family.attention_interface:
        raise ConfigError(file, f"{where}act_bits", f"activation quantization inside attention needs "
                          f"transformers' attention interface, which the {family.name} family's attention does "
                          "not use; set act_bits: 32 (weights are still quantized)")


def _depths(cfg: TrialConfig, where: str, file: str | None) -> tuple[int, int]:
    """(student layers, teacher layers), checked against each other."""
    try:
        t_layers = model_depth(cfg.teacher.checkpoint or cfg.teacher.model) or model_depth(cfg.teacher.model)
    except UnsupportedFamily as e:  # named by the field that gave the folder
        field = "teacher.checkpoint" if cfg.teacher.checkpoint else "teacher.model"
        raise ConfigError(file, f"{where}{field}", str(e)) from None
    if t_layers is None:
        raise ConfigError(file, f"{where}teacher.model", f"unknown depth of model '{cfg.teacher.model}'",
                          f"use one of {sorted(MODEL_ALIASES)} or a local folder with a config.json")
    init = cfg.student.init
    if init == "truncate":
        s_layers = cfg.student.layers or t_layers
        if s_layers > t_layers:
            raise ConfigError(file, f"{where}student.layers", f"{s_layers} layers, but the teacher has only "
                              f"{t_layers}", f"truncation keeps the bottom N <= {t_layers} teacher layers")
        return s_layers, t_layers
    if init == "teacher_copy":
        if cfg.student.layers not in (None, t_layers):
            raise ConfigError(file, f"{where}student.layers", "teacher_copy keeps the teacher's depth "
                              f"({t_layers})", "remove student.layers or use init: truncate")
        return t_layers, t_layers
    try:
        depth = model_depth(init)
    except UnsupportedFamily as e:
        raise ConfigError(file, f"{where}student.init", str(e)) from None
    if depth is None:
        raise ConfigError(file, f"{where}student.init", f"'{init}' is not truncate, teacher_copy, a known "
                          "model name or a local model folder", f"known models: {sorted(MODEL_ALIASES)}")
    if cfg.student.layers not in (None, depth):  # the named model is loaded whole: a depth would go unread
        raise ConfigError(file, f"{where}student.layers", f"student.init '{init}' is loaded with all its {depth} "
                          f"layers, so layers: {cfg.student.layers} would not be applied",
                          "remove student.layers, or use init: truncate to keep the teacher's bottom layers")
    return depth, t_layers


def _axes(cfg: TrialConfig, preset: Preset, notes: list[str]) -> tuple[Any, float | None, tuple]:
    """The trial's layer map, consistency weight and mixing coefficients; None where the method ignores one."""
    custom = cfg.method == "custom"
    layer_map = cfg.layer_map if cfg.layer_map is not None else preset.layer_map
    if preset.layer_map is None and not custom:
        layer_map = None  # collapsed: every term of the method pins its layers
        if cfg.layer_map is not None:
            notes.append(f"layer_map has no effect on method {cfg.method} (its terms do not take the trial's map)")
    cw = None
    if preset.uses_consistency:
        cw = cfg.consistency_weight if cfg.consistency_weight is not None else DEFAULT_CONSISTENCY_WEIGHT
    elif cfg.consistency_weight is not None and not custom:
        notes.append(f"consistency_weight has no effect on method {cfg.method}")
    coeffs: tuple[float | None, float | None] = (None, None)
    if preset.uses_mix_coeffs:
        coeffs = (cfg.map_coeff if cfg.map_coeff is not None else 1.0,
                  cfg.output_coeff if cfg.output_coeff is not None else 1.0)
    elif cfg.map_coeff is not None or cfg.output_coeff is not None:
        notes.append(f"map_coeff/output_coeff have no effect on method {cfg.method}")
    return layer_map, cw, coeffs


def _stage_plan(cfg: TrialConfig, preset: Preset, where: str, file: str | None
                ) -> list[tuple[str, StageTemplate | None, StageConfig | None]]:
    """(name, preset template or None, the file's override or None) for each stage the trial trains."""
    overrides = {s.name: s for s in cfg.train}
    if cfg.method == "custom":
        if not cfg.train:
            raise ConfigError(file, f"{where}train", "method 'custom' needs stages with their losses",
                              "list stages under train:, each with name and losses")
        return [(s.name, None, s) for s in cfg.train]
    # A stage override for a stage this method lacks is fine in a grid over methods (`ild` settings do not
    # apply to `kd`), but a name no method has is a typo.
    known = {t.name for p in PRESETS.values() for t in p.stages}
    unknown = [s for s in cfg.train if s.name not in known]
    if unknown:
        raise ConfigError(file, f"{where}train[{cfg.train.index(unknown[0])}].name",
                          f"no method has a stage '{unknown[0].name}'", f"stage names are {sorted(known)}")
    return [(t.name, t, overrides.get(t.name)) for t in preset.stages]


def _resolve_stage(ctx: _Context, name: str, tpl: StageTemplate | None, ov: StageConfig | None
                   ) -> ResolvedStage:
    spath = f"{ctx.where}train[{ctx.cfg.train.index(ov)}]" if ov else f"{ctx.where}train.{name}"
    if tpl is None and (ov is None or not ov.losses):
        raise ConfigError(ctx.file, f"{spath}.losses", "a custom stage needs its losses", "add losses: [...]")
    mixup = ov.mixup if ov and ov.mixup is not None else (tpl.mixup if tpl else False)
    losses = _stage_terms(ctx, tpl, ov, spath, mixup)
    consistency = _stage_consistency(ctx, tpl, ov, spath, mixup)
    supplementary = tpl.supplementary if tpl else False
    if supplementary and not ctx.cfg.data.supplementary_tasks:
        raise ConfigError(ctx.file, f"{ctx.where}data.supplementary_tasks", f"method '{ctx.cfg.method}' trains "
                          "on supplementary sentences, but none are configured, so that part never runs",
                          "list tasks, e.g. supplementary_tasks: [qnli, mrpc]")
    values = _stage_values(tpl, ov, ctx.cfg.task)
    if consistency is not None and consistency.ramp == "epoch" and values["max_steps"] is None \
            and values["epochs"] < 2:
        raise ConfigError(ctx.file, f"{spath}.epochs", f"consistency is ramped as w * epoch / E from epoch 0, so in "
                          f"a stage of {values['epochs']} epoch it is 0 at every step and never contributes",
                          "train this stage 2 epochs or more, or set its consistency: {ramp: step}")
    return ResolvedStage(name=name, losses=losses, mixup=mixup, consistency=consistency,
                         supplementary=supplementary, **values)


def _stage_values(tpl: StageTemplate | None, ov: StageConfig | None, task: str) -> dict[str, Any]:
    """Hyper-parameters: generic defaults < the preset's < the preset's for this task < the file's."""
    vals = dict(STAGE_DEFAULTS)
    if tpl is not None:
        vals.update(tpl.defaults)
        vals.update(tpl.by_task.get(task, {}))
    for f in STAGE_FIELDS:
        v = getattr(ov, f) if ov else None
        if v is not None:
            vals[f] = v
    return vals


def _stage_terms(ctx: _Context, tpl: StageTemplate | None, ov: StageConfig | None, spath: str,
                 mixup: bool) -> list[ResolvedLoss]:
    if ov and ov.losses and tpl is not None:
        _refuse_unread_coeffs(ctx, tpl, spath)
    raw = [t.model_dump(exclude_unset=True) for t in ov.losses] if ov and ov.losses else \
        [dict(t) for t in tpl.losses]  # type: ignore[union-attr]
    names = [t["name"] for t in raw]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:  # terms are logged and weighted by name: a second one would silently replace the first
        raise ConfigError(ctx.file, f"{spath}.losses", f"loss '{dup}' is listed twice in one stage",
                          "list each loss once; give it a layer_map that covers all the layers you want")
    labelled = next((n for n in names if n in LOSS_MENU and LOSS_MENU[n].reads_labels), None)
    if mixup and labelled:
        raise ConfigError(ctx.file, f"{spath}.losses", f"'{labelled}' reads gold labels, which cannot run on mixup "
                          "inputs (the mixed example has no single label)",
                          f"remove {labelled} from this stage or set mixup: false")
    losses = []
    for j, t in enumerate(raw):
        weight_from = t.pop("weight_from", None)
        term = LossTermConfig.model_validate(t)
        weight = term.weight
        if weight_from:
            weight = ctx.coeffs[0] if weight_from == "map_coeff" else ctx.coeffs[1]
            if weight == 0:
                continue  # a zero mixing coefficient drops the term (KD-QAT's ablation ends)
        losses.append(_resolve_term(ctx, term, weight, f"{spath}.losses[{j}]"))
    if not losses:
        raise ConfigError(ctx.file, f"{spath}.losses", "stage has no loss term left", "give it a loss term")
    return losses


def _refuse_unread_coeffs(ctx: _Context, tpl: StageTemplate, spath: str) -> None:
    """A stage whose own `losses` replace the preset's terms drops the terms `map_coeff` / `output_coeff`
    weight: a coefficient set for such a trial would weight nothing."""
    for term in tpl.losses:
        coeff = term.get("weight_from")
        if coeff and getattr(ctx.cfg, coeff) is not None:
            raise ConfigError(ctx.file, f"{ctx.where}{coeff}", f"{coeff} weights the preset's {term['name']} "
                              f"term of stage '{tpl.name}', but {spath}.losses lists the stage's own terms, so "
                              f"{coeff} would weight nothing",
                              f"remove {coeff} and give the weight in {spath}.losses, or drop {spath}.losses")


def _resolve_term(ctx: _Context, term: LossTermConfig, weight: float, tpath: str) -> ResolvedLoss:
    """One loss term: options it does not read are refused; per-layer losses get their layer pairs."""
    info = LOSS_MENU[term.name]
    _refuse_unread_options(ctx, term, tpath)
    options = {"temperature": term.temperature, "relations": list(term.relations),
               "projection": bool(term.projection)}
    kept = {k: v for k, v in options.items() if k in info.options}
    if not info.per_layer:
        return ResolvedLoss(name=term.name, weight=weight, **kept)
    spec = term.layer_map if term.layer_map is not None else ctx.layer_map
    path = f"{tpath}.layer_map" if term.layer_map is not None else f"{ctx.where}layer_map"
    if spec is None:
        raise ConfigError(ctx.file, f"{tpath}.layer_map", f"loss '{term.name}' needs a layer map",
                          "set layer_map: uniform|last|...")
    if term.layer_map is not None:  # a term's own map: equal mappings hash equal (see canonical_layer_map)
        spec = canonical_layer_map(term.layer_map, ctx.s_layers, ctx.t_layers)
        if spec != term.layer_map:
            ctx.notes.append(_respelled(path, term.layer_map, spec, ctx.s_layers, ctx.t_layers))
    try:
        pairs = resolve_layer_map(spec, ctx.s_layers, ctx.t_layers)
    except LayerMapError as e:
        raise ConfigError(ctx.file, path, f"{e} (student {ctx.s_layers} layers, teacher {ctx.t_layers})",
                          "use 'uniform', 'last' or layers that exist in both models") from None
    if term.include_embeddings:
        pairs = with_embeddings(pairs)
    return ResolvedLoss(name=term.name, weight=weight, layer_map=_label(spec), layer_pairs=pairs, **kept)


def _refuse_unread_options(ctx: _Context, term: LossTermConfig, tpath: str) -> None:
    info = LOSS_MENU[term.name]
    for option in sorted(term.model_fields_set - {"name", "weight", "layer_map"} - info.options):
        users = sorted(n for n, i in LOSS_MENU.items() if option in i.options)
        raise ConfigError(ctx.file, f"{tpath}.{option}", f"loss '{term.name}' does not read '{option}'",
                          f"remove it ('{option}' applies to {', '.join(users)})")
    if term.layer_map is not None and not info.per_layer:
        raise ConfigError(ctx.file, f"{tpath}.layer_map", f"loss '{term.name}' reads no layers, so a layer map "
                          "has nothing to map", "remove layer_map from this term")


def _stage_consistency(ctx: _Context, tpl: StageTemplate | None, ov: StageConfig | None, spath: str,
                       mixup: bool) -> ResolvedConsistency | None:
    configured = ov is not None and ov.consistency is not None
    if not ((tpl.consistency if tpl else False) or configured):
        return None
    weight = ctx.consistency_weight if ctx.consistency_weight is not None else (ctx.cfg.consistency_weight or 0.0)
    if weight == 0:
        if configured:
            raise ConfigError(ctx.file, f"{ctx.where}consistency_weight", "a consistency section is configured "
                              "but consistency_weight is 0, so the term would never contribute",
                              "set consistency_weight > 0 or remove the consistency section")
        return None
    if not mixup:
        raise ConfigError(ctx.file, f"{spath}.mixup", "consistency regularization compares mixed and clean "
                          "inputs, so it never fires without mixup", "set mixup: true")
    c = ov.consistency if configured else ConsistencyConfig()  # type: ignore[union-attr]
    if c.target != "ema" and "ema_decay" in c.model_fields_set:
        name = ov.name if ov else ""
        ctx.notes.append(f"train.{name}.consistency.ema_decay has no effect with target {c.target} "
                         "(the clean targets come from the student itself; not recorded)")
    return ResolvedConsistency(weight=weight, losses=list(c.losses), ramp=c.ramp, target=c.target,
                               ema_decay=c.ema_decay if c.target == "ema" else None)


def _respelled(path: str, written: Any, canonical: Any, s_layers: int, t_layers: int) -> str:
    return (f"{path} {written!r} maps the layers as {canonical!r} does for a {s_layers}-layer student of a "
            f"{t_layers}-layer teacher (hashed and named as {canonical!r})")


def _label(spec: Any) -> str | None:
    if spec is None:
        return None
    return spec if isinstance(spec, str) else ",".join(map(str, spec))
