"""Every encoder family of `kdplatform/families.py` exports to ONNX and int8 ONNX (issue 28: "every family the
platform supports exports"): a tiny random classifier of each family, full precision and as a 2-bit QAT
student, traced by `export_onnx`, quantized by `export_int8`, loaded in onnxruntime, and run on a padded
batch of a different length than the trace's (the axes are dynamic). The fp32 graph must give the PyTorch
logits; the QAT student's int8 graph holds its trained ternary codes, so it must too (up to the run-time
uint8 activation rounding, small at these sizes); a full-precision student's int8 graph must be smaller."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from family_models import tiny_config

ort = pytest.importorskip("onnxruntime")

from kdplatform.deploy.onnx_export import export_int8, export_onnx, input_names, open_session  # noqa: E402
from kdplatform.distill.quant import quantize_bert_  # noqa: E402
from kdplatform.families import FAMILIES  # noqa: E402

SENTENCES = ["a fine film", "the worst thing i have ever seen in a cinema, and i have seen many"]


def _classifier(family: str, bits: int, quantize_embeddings: bool = False) -> torch.nn.Module:
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    config = tiny_config(family)
    config.num_labels = 2
    model = AutoModelForSequenceClassification.from_config(config).eval()
    if bits < 32:
        quantize_bert_(model, bits, quantize_embeddings=quantize_embeddings)
    return model


def _onnx_logits(path, enc) -> np.ndarray:
    session = open_session(path, threads=1)
    return session.run(["logits"], {i.name: enc[i.name].numpy() for i in session.get_inputs()})[0]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_family_exports_to_onnx_and_int8(family, minilm, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm)
    enc = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    for bits in (32, 2):
        model = _classifier(family, bits)
        with torch.no_grad():
            reference = model(**{n: enc[n] for n in input_names(tokenizer)}).logits.numpy()
        fp32 = export_onnx(model, tokenizer, tmp_path / f"{bits}.onnx", seq_len=24)
        int8 = tmp_path / f"{bits}_int8.onnx"
        export_int8(model, fp32, int8)
        np.testing.assert_allclose(_onnx_logits(fp32, enc), reference, atol=1e-3, err_msg=f"{family} {bits}-bit fp32")
        if bits < 32:
            np.testing.assert_allclose(_onnx_logits(int8, enc), reference, atol=1e-2,
                                       err_msg=f"{family} 2-bit int8 against its trained codes")
        else:
            assert _onnx_logits(int8, enc).shape == reference.shape
            assert int8.stat().st_size < fp32.stat().st_size, f"{family}: int8 export is not smaller"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_exported_weights_are_the_ones_the_qat_forward_used(family, minilm):
    """`materialize` writes each quantized matrix as the QAT forward computes it (a fused QKV per Q/K/V
    block, not as one matrix; word embeddings per row), so the copy traced to ONNX gives the student's logits
    to float precision."""
    from transformers import AutoTokenizer

    from kdplatform.deploy.onnx_export import materialize

    tokenizer = AutoTokenizer.from_pretrained(minilm)
    enc = {n: t for n, t in tokenizer(SENTENCES, padding=True, return_tensors="pt").items()
           if n in input_names(tokenizer)}
    model = _classifier(family, 2, quantize_embeddings=True)
    with torch.no_grad():
        torch.testing.assert_close(materialize(model)[0](**enc).logits, model(**enc).logits)
