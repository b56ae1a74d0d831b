"""KD methods as named presets over the loss menu (pure data; no torch here).

A preset lists the stages a method trains through and, per stage, its loss terms and hyper-parameter
defaults. `config.resolve_trial` merges a user's `train:` overrides into these templates. A term whose
`layer_map` is None takes the trial's `layer_map` axis; `weight_from` names the trial field that gives the
term's weight (the KD-QAT mixing coefficients). A term's `projection` is the preset's default: True where the
reference learns a projection (TinyBERT/PKD `fit_dense`), False for the KD-QAT methods. How each preset
compares with its paper and reference code: docs/fidelity.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# CR-ILD, Appendix: ILD-stage epochs per task (small tasks 20, SST-2/QNLI 10, MNLI/QQP 5).
CR_ILD_EPOCHS = {"cola": 20, "mrpc": 20, "stsb": 20, "rte": 20, "wnli": 20, "sst2": 10, "qnli": 10,
                 "mnli": 5, "qqp": 5}

# Stage hyper-parameter defaults from the papers (DESIGN.md section 4).
ILD_STAGE = {"lr": 3e-5, "batch_size": 32, "warmup": 0.1, "weight_decay": 0.01, "max_grad_norm": 1.0,
             "eval_every": 50}
PRED_STAGE = {"epochs": 4, "lr": 3e-5, "batch_size": 16, "warmup": 0.1, "weight_decay": 0.01,
              "max_grad_norm": 1.0, "eval_every": 50}
# A stage that no preset defines (method: custom) starts from these, whatever its name.
STAGE_DEFAULTS = {"epochs": 3, "max_steps": None, "lr": 3e-5, "batch_size": 32, "warmup": 0.1,
                  "weight_decay": 0.01, "max_grad_norm": 1.0, "eval_every": 50}
# CR-ILD: consistency weight when the trial gives none (the paper's w = 0.1).
DEFAULT_CONSISTENCY_WEIGHT = 0.1
QAT_STAGE = {"epochs": 3, "lr": 2e-5, "batch_size": 32, "warmup": 0.1, "weight_decay": 0.01,
             "max_grad_norm": 1.0, "eval_every": 50}


@dataclass(frozen=True)
class StageTemplate:
    name: str
    losses: tuple[dict[str, Any], ...]
    defaults: dict[str, Any]
    mixup: bool = False
    consistency: bool = False  # weight comes from the trial's `consistency_weight` axis
    supplementary: bool = False  # also train on data.supplementary_tasks sentences (label-free terms)
    by_task: dict[str, dict[str, Any]] = field(default_factory=dict)  # task -> defaults for that task


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    stages: tuple[StageTemplate, ...]
    layer_map: str | None = None  # default for the `layer_map` axis; None: the method takes no layer map
    uses_consistency: bool = False
    uses_mix_coeffs: bool = False  # map_coeff / output_coeff axes (kdqat_unified)
    paper: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _pred_stage(temperature: float = 2.0) -> StageTemplate:
    # CR-ILD stage 2: prediction-layer KD, T=2, no hard-label CE.
    return StageTemplate("pred", ({"name": "logit_kd", "temperature": temperature},), PRED_STAGE)


def _ild_stage(losses: tuple[dict[str, Any], ...], **kw: Any) -> StageTemplate:
    by_task = {task: {"epochs": epochs} for task, epochs in CR_ILD_EPOCHS.items()}
    return StageTemplate("ild", losses, ILD_STAGE, by_task=by_task, **kw)


def _qat_stage(*extra: dict[str, Any]) -> StageTemplate:
    base = ({"name": "logit_kd", "temperature": 1.0},
            {"name": "hidden_mse", "include_embeddings": True, "projection": False})
    return StageTemplate("qat", base + extra, QAT_STAGE, by_task={"cola": {"batch_size": 16}})  # KD-QAT: CoLA 16


_RELATIONS = {"name": "relation_kl", "relations": ["q", "k", "v"]}
_LAST_RELATIONS = {**_RELATIONS, "layer_map": "last"}

PRESETS: dict[str, Preset] = {p.name: p for p in [
    Preset("kd", "prediction-layer KD only (Hinton et al.): soft cross-entropy on logits, T=2",
           (_pred_stage(),), paper="CR-ILD baseline"),
    # The floor every KD method must beat: the same student trained on the labels alone (no teacher term).
    Preset("finetune", "no teacher: the student fine-tuned on hard labels (cross-entropy; MSE for regression) in "
           "the prediction stage's schedule, the floor a KD method must beat",
           (StageTemplate("pred", ({"name": "ce"},), PRED_STAGE),), paper="baseline"),
    Preset("pkd", "Patient KD: MSE of L2-normalised [CLS] states of mapped layers (averaged over layers, learned "
           "projection as in the reference), then prediction KD",
           (_ild_stage(({"name": "pkd", "projection": True},)), _pred_stage()), layer_map="uniform",
           paper="CR-ILD baseline"),
    Preset("tinybert", "TinyBERT ILD: hidden-state MSE (with embeddings, learned projection as in the reference) + "
           "attention KL on mapped layers, then prediction KD",
           (_ild_stage(({"name": "hidden_mse", "include_embeddings": True, "projection": True},
                        {"name": "attention_kl"})),
            _pred_stage()), layer_map="uniform", paper="CR-ILD baseline"),
    Preset("minilm", "MiniLMv2: Q-Q, K-K, V-V self-attention relation KL on mapped layers, then prediction KD",
           (_ild_stage((_RELATIONS,)), _pred_stage()), layer_map="uniform", paper="CR-ILD baseline"),
    Preset("ild_last", "ILD on the last layer only (relation KL, Q/K/V), then prediction KD: CR-ILD without "
           "mixup and consistency", (_ild_stage((_LAST_RELATIONS,)), _pred_stage()),
           paper="CR-ILD"),
    # CR-ILD is last-layer by definition: its term pins `last`, so a layer_map axis collapses for it.
    Preset("cr_ild", "CR-ILD: last-layer relation KL on embedding-mixup inputs + consistency regularization "
           "(paper default: last-layer attention KL + hidden MSE, weight consistency_weight = 0.1, ramp "
           "w * epoch / E; options: relation_kl, ramp: step), then prediction KD",
           (_ild_stage((_LAST_RELATIONS,), mixup=True, consistency=True), _pred_stage()),
           uses_consistency=True, paper="CR-ILD"),
    Preset("supplementary_ild", "last-layer relation KL also on unlabeled sentences of data.supplementary_tasks, "
           "then prediction KD", (_ild_stage((_LAST_RELATIONS,), supplementary=True),
                                  _pred_stage()), paper="CR-ILD"),
    Preset("ternarybert", "TernaryBERT: logit KD (T=1) + hidden MSE (all layers, no projection) + attention-score MSE",
           (_qat_stage({"name": "attention_score_mse"}),), layer_map="uniform", paper="KD-QAT baseline"),
    Preset("kdqat_map", "KD-QAT: logit KD (T=1) + hidden MSE + attention-map KL",
           (_qat_stage({"name": "attention_map_kl"}),), layer_map="uniform", paper="KD-QAT"),
    Preset("kdqat_output", "KD-QAT: logit KD (T=1) + hidden MSE + attention-output MSE",
           (_qat_stage({"name": "attention_output_mse"}),), layer_map="uniform", paper="KD-QAT"),
    Preset("kdqat_unified", "KD-QAT: logit KD + hidden MSE + map_coeff * attention-map KL + "
           "output_coeff * attention-output MSE",
           (_qat_stage({"name": "attention_map_kl", "weight_from": "map_coeff"},
                       {"name": "attention_output_mse", "weight_from": "output_coeff"}),),
           layer_map="uniform", uses_mix_coeffs=True, paper="KD-QAT"),
    Preset("custom", "your own stages: every stage under `train:` lists its `losses`", (), paper=""),
]}

METHOD_NAMES = tuple(PRESETS)
