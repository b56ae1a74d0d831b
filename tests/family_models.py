"""Tiny random encoders of every family in `kdplatform/families.py`, built from a config (no download), saved
with the real MiniLM tokenizer (BERT WordPiece, 30522 tokens) so trials run the real code paths in seconds."""

from __future__ import annotations

from pathlib import Path

# Sizes every tiny model shares; pad token 0 (the BERT tokenizer's) everywhere, so RoBERTa-style position ids
# (counted from the padding index) stay inside max_position_embeddings.
VOCAB, WIDTH, LAYERS, HEADS, FFN, POSITIONS = 30522, 32, 4, 4, 64, 130


def tiny_config(family: str, width: int = WIDTH, layers: int = LAYERS, heads: int = HEADS, ffn: int = FFN):
    """A transformers config of this family at these sizes (dropout left at each family's default)."""
    import transformers as tf

    common = dict(vocab_size=VOCAB, pad_token_id=0, max_position_embeddings=POSITIONS)
    bert_like = dict(hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=ffn, **common)
    if family == "bert":
        return tf.BertConfig(**bert_like)
    if family == "roberta":
        return tf.RobertaConfig(**bert_like)
    if family == "xlm-roberta":
        return tf.XLMRobertaConfig(**bert_like)
    if family == "electra":
        return tf.ElectraConfig(embedding_size=width, **bert_like)
    if family == "mpnet":
        return tf.MPNetConfig(**bert_like)
    if family == "distilbert":
        return tf.DistilBertConfig(dim=width, n_layers=layers, n_heads=heads, hidden_dim=ffn, **common)
    if family == "deberta-v2":  # as DeBERTa-v3: relative attention, both disentangled terms, no absolute positions
        return tf.DebertaV2Config(relative_attention=True, pos_att_type=["p2c", "c2p"], position_biased_input=False,
                                  position_buckets=8, max_relative_positions=-1, norm_rel_ebd="layer_norm",
                                  share_att_key=True, type_vocab_size=0, **bert_like)
    if family == "modernbert":  # local windows of 8 tokens every other layer: they change the maps at 16 tokens
        return tf.ModernBertConfig(hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
                                   intermediate_size=ffn, global_attn_every_n_layers=2, local_attention=8,
                                   bos_token_id=101, eos_token_id=102, cls_token_id=101, sep_token_id=102,
                                   **common)
    raise KeyError(family)


def save_tiny(family: str, folder: Path, tokenizer_from: str, seed: int = 0, **sizes) -> Path:
    """The tiny model saved like a pretrained checkpoint (base model weights + the MiniLM tokenizer)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    torch.manual_seed(seed)
    AutoModel.from_config(tiny_config(family, **sizes)).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_from).save_pretrained(folder)
    return folder
