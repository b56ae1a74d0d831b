"""Does the exported model predict what the PyTorch student predicts? Both run on the trial's own dev set
(same examples, tokenization and padding as its evaluation); classification compares predicted labels,
regression the predicted values.

>>> batches = dev_batches(trial, tokenizer)                                    # doctest: +SKIP
>>> compare("sst2", torch_logits(model, batches), onnx_logits(session, batches), labels(batches))  # doctest: +SKIP
{'examples': 872, 'label_agreement': 1.0, 'max_abs_diff': 2.3e-06, 'dev_score_pytorch': 0.81, ...}
"""

from __future__ import annotations

import numpy as np
import torch

from kdplatform.config import ResolvedTrial
from kdplatform.distill.tasks import TASKS, compute_metrics

EVAL_BATCH = 64
MODEL_KEYS = ("input_ids", "token_type_ids", "attention_mask")


def dev_batches(trial: ResolvedTrial, tokenizer, batch_size: int = EVAL_BATCH,
                limit: int | None = None) -> list[dict[str, torch.Tensor]]:
    """The trial's dev batches ("dev" split), as its evaluation builds them; `limit`: the first N examples."""
    from kdplatform.distill.data import eval_loader, prepare_data

    data = prepare_data(trial, tokenizer)
    feats = data.dev["dev"][:limit] if limit else data.dev["dev"]
    return list(eval_loader(feats, batch_size, data.collator))


def labels(batches: list[dict[str, torch.Tensor]]) -> np.ndarray:
    return torch.cat([b["labels"] for b in batches]).numpy()


def torch_logits(model, batches: list[dict[str, torch.Tensor]]) -> np.ndarray:
    with torch.inference_mode():
        out = [model(**{k: v for k, v in b.items() if k in MODEL_KEYS}).logits for b in batches]
    return torch.cat(out).float().numpy()


def onnx_logits(session, batches: list[dict[str, torch.Tensor]]) -> np.ndarray:
    names = [i.name for i in session.get_inputs()]
    return np.concatenate([session.run(["logits"], {n: b[n].numpy().astype(np.int64) for n in names})[0]
                           for b in batches])


def compare(task: str, reference: np.ndarray, exported: np.ndarray, gold: np.ndarray) -> dict[str, float]:
    """Agreement of `exported` with `reference` logits, and both dev scores. Classification:
    `label_agreement`, the share of examples with the same argmax; every task: `max_abs_diff` of the outputs
    (for regression the predictions themselves)."""
    out = {"examples": int(len(reference)), "max_abs_diff": float(np.abs(reference - exported).max()),
           "dev_score_pytorch": compute_metrics(task, reference, gold)["score"],
           "dev_score_exported": compute_metrics(task, exported, gold)["score"]}
    if not TASKS[task].is_regression:
        out["label_agreement"] = float((reference.argmax(-1) == exported.argmax(-1)).mean())
    return out


def failure(result: dict[str, float], min_agreement: float, max_abs_diff: float) -> str | None:
    """Why `result` misses the threshold (label agreement for classification, max abs diff for regression),
    or None when it passes."""
    if "label_agreement" in result:
        if result["label_agreement"] < min_agreement:
            return f"label agreement {result['label_agreement']:.4f} < --min-agreement {min_agreement}"
        return None
    if result["max_abs_diff"] > max_abs_diff:
        return f"max abs diff {result['max_abs_diff']:.4g} > --max-abs-diff {max_abs_diff}"
    return None
