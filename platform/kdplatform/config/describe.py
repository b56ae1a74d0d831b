"""What a resolved trial computes, in words: per stage, each loss term with its layer pairs and weight.

`--dry-run` prints it, so a wrong mapping is visible before any compute is spent.

>>> describe_trial(trial)                                                   # doctest: +SKIP
['ild: 20 epochs, lr 3e-05, batch 32, mixup',
 '  relation_kl x1 on (6,12) [q,k,v]',
 '  consistency x0.1 (ramp epoch): attention_kl + hidden_mse on the last student layer (6), target no_grad',
 'pred: 4 epochs, lr 3e-05, batch 16',
 '  logit_kd x1 T=2']
"""

from __future__ import annotations

from kdplatform.config.trial import ResolvedLoss, ResolvedStage, ResolvedTrial
from kdplatform.loss_menu import LOSS_MENU


def describe_trial(trial: ResolvedTrial) -> list[str]:
    """One line per stage and one per loss term (layer pairs student:teacher, weight, options)."""
    lines = []
    for stage in trial.train:
        lines.append(_stage_line(stage))
        lines += [f"  {describe_loss(t)}" for t in stage.losses]
        cr = stage.consistency
        if cr is not None:
            target = cr.target + (f" (decay {cr.ema_decay:g})" if cr.ema_decay is not None else "")
            lines.append(f"  consistency x{cr.weight:g} (ramp {cr.ramp}): {' + '.join(cr.losses)} on the last "
                         f"student layer ({trial.student_layers}), target {target}")
    return lines


def describe_loss(term: ResolvedLoss) -> str:
    """'hidden_mse x1 on (0,0) (1,2) (2,4) projected': the term, its weight, pairs and options."""
    text = f"{term.name} x{term.weight:g}"
    if term.layer_pairs:
        text += " on " + " ".join(f"({s},{t})" for s, t in term.layer_pairs)
    if "temperature" in LOSS_MENU[term.name].options:
        text += f" T={term.temperature:g}"
    if term.relations:
        text += f" [{','.join(term.relations)}]"
    if term.projection:
        text += " projected"
    return text


def _stage_line(stage: ResolvedStage) -> str:
    length = f"{stage.max_steps} steps" if stage.max_steps else f"{stage.epochs} epochs"
    extra = [x for x, on in (("mixup", stage.mixup), ("supplementary sentences", stage.supplementary)) if on]
    return (f"{stage.name}: {length}, lr {stage.lr:g}, batch {stage.batch_size}, eval every {stage.eval_every}"
            + "".join(f", {x}" for x in extra))


def describe_trials(trials: list[ResolvedTrial]) -> list[str]:
    """`describe_trial` for many trials: each distinct computation once, with the trials that share it."""
    groups: dict[tuple[str, ...], list[str]] = {}
    for t in trials:
        groups.setdefault((f"{t.student_layers}-layer student, {t.teacher_layers}-layer teacher",
                           *describe_trial(t)), []).append(t.run_name)
    out = []
    for lines, names in groups.items():
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        out += [f"{len(names)} trial(s) ({shown}): {lines[0]}", *(f"  {line}" for line in lines[1:])]
    return out
