"""Tiny CPU example assets: a char-level HF tokenizer with a chat template and a tiny Qwen2 model config.

The tokenizer maps every printable ASCII character to one token (digits are single tokens, ideal for
arithmetic) plus special tokens; it is saved as a `PreTrainedTokenizerFast` (tokenizer.json +
tokenizer_config.json with the chat template), loadable with `AutoTokenizer.from_pretrained(dir)`.

It is a byte-level BPE with no merges (GPT-2 byte-to-unicode alphabet, ' ' is 'Ġ'): in a directory
whose config.json says `model_type: qwen2`, transformers 5 loads it as `Qwen2Tokenizer`, which rebuilds
a byte-level pipeline from vocab + merges; a plain char-level WordLevel tokenizer would silently lose
its spaces there. Built this way, both classes give identical ids.
"""
from __future__ import annotations

import os
import string

PAD, UNK, EOS, USER, ASSISTANT = "<pad>", "<unk>", "<|end|>", "<|user|>", "<|assistant|>"
SPECIALS = [PAD, UNK, EOS, USER, ASSISTANT]
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}<|user|>{{ m['content'] }}"
    "{% else %}<|assistant|>{{ m['content'] }}<|end|>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
VOCAB_SIZE = 128  # model vocab (>= tokenizer size; a multiple of 64 for TP-friendly splits)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode map (the ByteLevel alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def build_tokenizer(out_dir: str):
    """Build and save the char-level tokenizer into `out_dir`; returns the PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in string.printable if c not in "\t\r\x0b\x0c"]  # includes ' ' and '\n'
    b2u = _bytes_to_unicode()
    vocab = {tok: i for i, tok in enumerate(SPECIALS + [b2u[ord(c)] for c in chars])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, unk_token=UNK, eos_token=EOS,
                                   bos_token=None, additional_special_tokens=[USER, ASSISTANT])
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"
    assert len(fast) <= VOCAB_SIZE
    os.makedirs(out_dir, exist_ok=True)
    fast.save_pretrained(out_dir)
    return fast


def tiny_qwen2_config(tokenizer, hidden: int = 128, layers: int = 3, heads: int = 4, kv_heads: int = 2,
                      max_pos: int = 512):
    """A Qwen2-shaped config: GQA, SwiGLU, RMSNorm, RoPE, tied embeddings; ~0.5M parameters."""
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=VOCAB_SIZE, hidden_size=hidden, intermediate_size=hidden * 3,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                       max_position_embeddings=max_pos, rope_theta=10000.0, rms_norm_eps=1e-6,
                       tie_word_embeddings=True, hidden_act="silu", attention_dropout=0.0,
                       pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                       bos_token_id=tokenizer.eos_token_id, torch_dtype="float32")
