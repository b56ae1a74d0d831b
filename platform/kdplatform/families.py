"""The encoder family table: for each Hugging Face encoder family, where its parts are and how it attends.

Pure data (no torch): the config layer reads depth and width keys and the family of a local model folder when
a file is checked; the worker's loader, feature taps, embedding mixup and quantizer ask the table for module
paths. This is the only place in the package that names a family's module paths. Every row was checked
against the installed transformers (5.25) source; `docs/families.md` explains each column.

Module paths are strings, as torchdistill writes them: `layers` is relative to the model's `base_model`, the
others relative to one layer (`embeddings`, `word_embeddings` relative to `base_model` too).

How each family's real attention maps are read (`maps`):
- "recompute": softmax(Q K^T / sqrt(d_head) + mask) from the tapped Q and K IS the model's attention (absolute
  position embeddings are added before the first layer, nothing enters the scores), so the model keeps SDPA
  and the maps are recomputed from Q and K (which the teacher output cache can store per token).
- "interface": the family's attention goes through transformers' `AttentionInterface`, but position terms
  (ModernBERT's rotary embeddings, its local-window mask) enter between the Q/K projections and the softmax:
  while a loss needs maps, the model runs kdplatform's registered eager attention function, which records the
  scores and probabilities it computes.
- "probs_dropout": the family computes attention itself (no interface; MPNet's relative position bias,
  DeBERTa's disentangled content-position terms) and passes its probabilities through an `nn.Dropout` module
  (`probs_dropout`): a forward hook reads that module's input, the exact probabilities `output_attentions`
  returns in eval mode (before dropout in training).

Adding a family: one `Family` row below plus its tiny random config in tests/test_families.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

MAP_SOURCES = ("recompute", "interface", "probs_dropout")


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]  # config.json `model_type` values of this family
    layers: str  # the ModuleList of encoder layers, from base_model
    query: str  # Q, K, V projections (nn.Linear), from a layer; `qkv` instead when fused
    key: str
    value: str
    attention: str  # the module that computes attention: calls the attention function / owns the probs dropout
    attn_output: str  # W_O, the linear after attention
    attn_out_tap: str  # module whose output is the attention sub-layer output LN(W_O ctx + b + x)
    ffn_in: str
    ffn_out: str
    embeddings: str  # the embedding module (CR-ILD's mixup hooks its output), from base_model
    word_embeddings: str  # from base_model
    depth_key: str  # config.json keys
    width_key: str
    heads_key: str
    token_type_ids: bool  # whether its forward takes token_type_ids (passed when the tokenizer gives them)
    attn_implementation: str  # what it is loaded with: "sdpa" where the family supports it, else "eager"
    maps: str  # how its real attention probabilities are read (MAP_SOURCES)
    positions: str  # how positions enter (docs)
    qkv: str = ""  # a fused Q/K/V projection: output [Q | K | V] along the last axis
    probs_dropout: str = ""  # maps == "probs_dropout": the dropout module applied to the probabilities
    per_layer_config: tuple[str, ...] = ()  # config lists with one entry per layer (cut when truncating)

    @property
    def attention_interface(self) -> bool:
        """Whether its attention passes through transformers' AttentionInterface (activation quantization
        inside attention and the recording attention function need it)."""
        return self.maps in ("recompute", "interface")

    def linears(self) -> tuple[str, ...]:
        """The linears of one layer that QAT quantizes: Q, K, V (or the fused QKV), attention output, FFN."""
        qkv = (self.qkv,) if self.qkv else (self.query, self.key, self.value)
        return (*qkv, self.attn_output, self.ffn_in, self.ffn_out)


_BERT_PATHS = dict(layers="encoder.layer", query="attention.self.query", key="attention.self.key",
                   value="attention.self.value", attention="attention.self", attn_output="attention.output.dense",
                   attn_out_tap="attention.output", ffn_in="intermediate.dense", ffn_out="output.dense",
                   embeddings="embeddings", word_embeddings="embeddings.word_embeddings",
                   depth_key="num_hidden_layers", width_key="hidden_size", heads_key="num_attention_heads",
                   attn_implementation="sdpa", maps="recompute", positions="absolute embeddings")

FAMILIES: dict[str, Family] = {f.name: f for f in [
    Family("bert", ("bert",), token_type_ids=True, **_BERT_PATHS),
    Family("roberta", ("roberta",), token_type_ids=True, **_BERT_PATHS),  # its tokenizers give none
    Family("xlm-roberta", ("xlm-roberta",), token_type_ids=True, **_BERT_PATHS),
    Family("electra", ("electra",), token_type_ids=True, **_BERT_PATHS),
    Family("distilbert", ("distilbert",), layers="transformer.layer", query="attention.q_lin",
           key="attention.k_lin", value="attention.v_lin", attention="attention", attn_output="attention.out_lin",
           attn_out_tap="sa_layer_norm", ffn_in="ffn.lin1", ffn_out="ffn.lin2", embeddings="embeddings",
           word_embeddings="embeddings.word_embeddings", depth_key="n_layers", width_key="dim",
           heads_key="n_heads", token_type_ids=False, attn_implementation="sdpa", maps="recompute",
           positions="absolute embeddings"),
    Family("mpnet", ("mpnet",), layers="encoder.layer", query="attention.attn.q", key="attention.attn.k",
           value="attention.attn.v", attention="attention.attn", attn_output="attention.attn.o",
           attn_out_tap="attention", ffn_in="intermediate.dense", ffn_out="output.dense", embeddings="embeddings",
           word_embeddings="embeddings.word_embeddings", depth_key="num_hidden_layers", width_key="hidden_size",
           heads_key="num_attention_heads", token_type_ids=False, attn_implementation="eager",
           maps="probs_dropout", probs_dropout="attention.attn.dropout",
           positions="absolute embeddings + relative position bias in the scores"),
    Family("deberta-v2", ("deberta-v2",), layers="encoder.layer", query="attention.self.query_proj",
           key="attention.self.key_proj", value="attention.self.value_proj", attention="attention.self",
           attn_output="attention.output.dense", attn_out_tap="attention.output", ffn_in="intermediate.dense",
           ffn_out="output.dense", embeddings="embeddings", word_embeddings="embeddings.word_embeddings",
           depth_key="num_hidden_layers", width_key="hidden_size", heads_key="num_attention_heads",
           token_type_ids=True, attn_implementation="eager", maps="probs_dropout",
           probs_dropout="attention.self.dropout",
           positions="disentangled content-to-position and position-to-content terms in the scores"),
    Family("modernbert", ("modernbert",), layers="layers", query="", key="", value="", qkv="attn.Wqkv",
           attention="attn", attn_output="attn.Wo", attn_out_tap="mlp_norm", ffn_in="mlp.Wi", ffn_out="mlp.Wo",
           embeddings="embeddings", word_embeddings="embeddings.tok_embeddings", depth_key="num_hidden_layers",
           width_key="hidden_size", heads_key="num_attention_heads", token_type_ids=False,
           attn_implementation="sdpa", maps="interface", per_layer_config=("layer_types",),
           positions="rotary embeddings on Q and K; local sliding-window layers"),
]}

_BY_MODEL_TYPE = {t: f for f in FAMILIES.values() for t in f.model_types}


class UnsupportedFamily(ValueError):
    """A model whose family is not in the table."""


def supported() -> str:
    return ", ".join(FAMILIES)


def family_of_type(model_type: str | None, where: str = "model") -> Family:
    """The family of a config's `model_type`; an unknown one raises `UnsupportedFamily` with one line."""
    fam = _BY_MODEL_TYPE.get(model_type or "")
    if fam is None:
        raise UnsupportedFamily(f"{where}: model family {model_type!r} is not supported (supported families: "
                                f"{supported()}); use a model of one of those families")
    return fam


def read_model_config(folder: str | Path) -> dict | None:
    """A local model folder's config.json as a dict (None when absent or unreadable)."""
    cfg = Path(folder) / "config.json"
    if not cfg.is_file():
        return None
    try:
        data = json.loads(cfg.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


MAP_NOTES = {"recompute": "softmax(QK^T/sqrt(d)+mask) from Q, K (exact)",
             "interface": "recorded by the eager attention function",
             "probs_dropout": "read at the probabilities' dropout (= output_attentions)"}


def family_rows() -> list[dict[str, str]]:
    """The family table as text rows (`kdplatform models`, docs/families.md): what each family supports."""
    return [{"family": f.name, "model types": ", ".join(f.model_types),
             "depth / width": f"{f.depth_key} / {f.width_key}",
             "attention": f.attn_implementation, "positions": f.positions,
             "ILD maps": MAP_NOTES[f.maps],
             "QAT weights": ", ".join(p if p != f.qkv else f"{p} (per third)" for p in f.linears()),
             "QAT activations": "yes" if f.attention_interface else "no (act_bits refused)",
             "mixup": f.embeddings + " output"} for f in FAMILIES.values()]
