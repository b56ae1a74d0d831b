"""`kdplatform export RUN_ID DIR --format onnx [--int8]`: a student run's model as a deployable folder.

DIR holds `model.onnx` (fp32), with --int8 also `model_int8.onnx`, the tokenizer and config.json (labels),
`agreement.json` (each exported model's dev predictions against the PyTorch student's) and a README.md. The
folder is built beside DIR and moved into place only when the exported model (int8 when asked, else fp32)
meets the agreement threshold: a failed check leaves nothing behind and exits 2.

>>> export_deployable("sqlite:////abs/mlflow.db", RUN_ID, Path("deployed"), int8=True)   # doctest: +SKIP
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from kdplatform.deploy import agreement as A
from kdplatform.deploy.onnx_export import export_int8, export_onnx, is_quantized, open_session
from kdplatform.deploy.source import fetch_student
from kdplatform.distill.export import ExportError

FP32_FILE, INT8_FILE, AGREEMENT_FILE = "model.onnx", "model_int8.onnx", "agreement.json"


class AgreementError(ExportError):
    """The exported model disagrees with the PyTorch student more than the user allows (exit 2)."""


@dataclass
class Exported:
    folder: Path
    agreement: dict[str, dict]  # file name -> compare() result
    notes: list[str] = field(default_factory=list)
    sizes_mb: dict[str, float] = field(default_factory=dict)


def export_deployable(tracking_uri: str, run_id: str, dest: Path, which: str = "best", int8: bool = False,
                      min_agreement: float = 0.99, max_abs_diff: float = 0.05, examples: int | None = None,
                      say: Callable[[str], None] = print) -> Exported:
    """Export run `run_id`'s student to ONNX (and int8) into `dest`, checked against the PyTorch student on
    the trial's dev set (`examples`: the first N only). Raises ExportError / AgreementError (one line)."""
    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ExportError(f"{dest} exists and is not an empty folder: name a new one")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".kdp_onnx_", dir=dest.parent) as tmp:
        work, out = Path(tmp) / "work", Path(tmp) / "out"
        work.mkdir(), out.mkdir()
        student = fetch_student(tracking_uri, run_id, work, which)
        model, tokenizer = student.model(), student.tokenizer()
        seq = student.trial.data.max_seq_length
        files = [export_onnx(model, tokenizer, out / FP32_FILE, seq)]
        notes: list[str] = []
        if int8:
            notes = export_int8(model, files[0], out / INT8_FILE)
            files.append(out / INT8_FILE)
        for n in notes:
            say(f"note: {n}")
        batches = A.dev_batches(student.trial, tokenizer, limit=examples)
        reference, gold = A.torch_logits(model, batches), A.labels(batches)
        result = {f.name: A.compare(student.trial.task, reference, A.onnx_logits(open_session(f), batches), gold)
                  for f in files}
        for name, r in result.items():
            say(describe(name, r))
        tokenizer.save_pretrained(out)
        model.config.save_pretrained(out)
        sizes = {f.name: f.stat().st_size / 1e6 for f in files}
        info = {"run_id": run_id, "which": which, "task": student.trial.task, "quantized": is_quantized(model),
                "seq_len": seq, "agreement": result, "notes": notes, "size_mb": sizes,
                "pytorch_weights_mb": student.weights_mb()}
        (out / AGREEMENT_FILE).write_text(json.dumps(info, indent=2) + "\n")
        (out / "README.md").write_text(_readme(run_id, student.trial.task, files, notes))
        why = A.failure(result[files[-1].name], min_agreement, max_abs_diff)
        if why:
            raise AgreementError(f"{files[-1].name} of run {run_id}: {why}; nothing written to {dest} "
                                 f"(lower the threshold to keep it)")
        if dest.exists():
            dest.rmdir()
        shutil.move(str(out), dest)
    return Exported(dest, result, notes, sizes)


def describe(name: str, r: dict) -> str:
    """One line: how well an exported file agrees with the PyTorch student."""
    head = f"{name}: {r['examples']} dev examples"
    if "label_agreement" in r:
        head += f", label agreement {r['label_agreement'] * 100:.2f}%"
    return (f"{head}, max abs logit diff {r['max_abs_diff']:.3g}, dev score {r['dev_score_exported']:.4f} "
            f"(PyTorch {r['dev_score_pytorch']:.4f})")


def _readme(run_id: str, task: str, files: list[Path], notes: list[str]) -> str:
    lines = [f"# Student of MLflow run {run_id} ({task}), exported by `kdplatform export --format onnx`", "",
             "```python", "import onnxruntime as ort", "from transformers import AutoTokenizer",
             "tok = AutoTokenizer.from_pretrained('.')",
             f"session = ort.InferenceSession('{files[-1].name}', providers=['CPUExecutionProvider'])",
             "enc = tok(['a fine film'], return_tensors='np')",
             "logits = session.run(['logits'], {i.name: enc[i.name] for i in session.get_inputs()})[0]", "```",
             "", f"Agreement with the PyTorch student on dev: {AGREEMENT_FILE}."]
    lines += [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"
