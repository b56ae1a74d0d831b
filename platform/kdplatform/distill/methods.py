"""KD methods as named presets over the loss menu (pure data; no torch here).

A preset lists the stages a method trains through and, per stage, its loss terms and hyper-parameter
defaults. `config.resolve_trial` merges a user's `train:` overrides into these templates. A term whose
`layer_map` is None takes the trial's `layer_map` axis; `weight_from` names the trial field that gives the
term's weight (the KD-QAT mixing coefficients).
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
    return StageTemplate("ild", losses, ILD_STAGE, **kw)


def _qat_stage(*extra: dict[str, Any]) -> StageTemplate:
    base = ({"name": "logit_kd", "temperature": 1.0}, {"name": "hidden_mse", "include_embeddings": True})
    return StageTemplate("qat", base + extra, QAT_STAGE)


_RELATIONS = {"name": "relation_kl", "relations": ["q", "k", "v"]}

PRESETS: dict[str, Preset] = {p.name: p for p in [
    Preset("kd", "prediction-layer KD only (Hinton et al.): soft cross-entropy on logits, T=2",
           (_pred_stage(),), paper="CR-ILD baseline"),
    Preset("pkd", "Patient KD: MSE of L2-normalised [CLS] states of mapped layers, then prediction KD",
           (_ild_stage(({"name": "pkd"},)), _pred_stage()), layer_map="uniform", paper="CR-ILD baseline"),
    Preset("tinybert", "TinyBERT ILD: hidden-state MSE (with embeddings) + attention KL on mapped layers, "
           "then prediction KD",
           (_ild_stage(({"name": "hidden_mse", "include_embeddings": True}, {"name": "attention_kl"})),
            _pred_stage()), layer_map="uniform", paper="CR-ILD baseline"),
    Preset("minilm", "MiniLMv2: Q-Q, K-K, V-V self-attention relation KL on mapped layers, then prediction KD",
           (_ild_stage((_RELATIONS,)), _pred_stage()), layer_map="uniform", paper="CR-ILD baseline"),
    Preset("ild_last", "ILD on the last layer only (relation KL, Q/K/V), then prediction KD: CR-ILD without "
           "mixup and consistency", (_ild_stage(({**_RELATIONS, "layer_map": "last"},)), _pred_stage()),
           paper="CR-ILD"),
    Preset("cr_ild", "CR-ILD: last-layer relation KL on embedding-mixup inputs + consistency regularization "
           "(weight = consistency_weight, linear ramp), then prediction KD",
           (_ild_stage((_RELATIONS,), mixup=True, consistency=True), _pred_stage()),
           layer_map="last", uses_consistency=True, paper="CR-ILD"),
    Preset("supplementary_ild", "last-layer relation KL also on unlabeled sentences of data.supplementary_tasks, "
           "then prediction KD", (_ild_stage(({**_RELATIONS, "layer_map": "last"},), supplementary=True),
                                  _pred_stage()), paper="CR-ILD"),
    Preset("ternarybert", "TernaryBERT: logit KD (T=1) + hidden MSE (all layers) + attention-score MSE",
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
