"""A CLIP BPE tokenizer for the world's vocabulary, built offline from the word list.

The vocabulary holds CLIP's 512 byte-level symbols (each byte alone and with the end-of-word mark
"</w>"), every suffix of every world word, and the two special tokens. Merges join a character onto
the end-of-word suffix that follows it, right to left, so every world word becomes exactly one token
and any other text still tokenizes into byte-level symbols.
"""

from __future__ import annotations

from pathlib import Path

from diffprobe.io import atomic_path, save_json

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible map from bytes to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def build_vocab(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(token -> id, merges in rank order) for lowercase ASCII `words`."""
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols]
    merges: list[tuple[str, str]] = []
    for word in words:
        suffix = word[-1] + "</w>"
        for ch in reversed(word[:-1]):
            merged = ch + suffix
            if (ch, suffix) not in merges:
                merges.append((ch, suffix))
                tokens.append(merged)
            suffix = merged
    tokens += [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_tokenizer(out_dir: str | Path, words: list[str], max_length: int) -> Path:
    """Write vocab.json, merges.txt and tokenizer_config.json for transformers' CLIPTokenizer."""
    out_dir = Path(out_dir)
    vocab, merges = build_vocab(words)
    save_json(out_dir / "vocab.json", vocab)
    with atomic_path(out_dir / "merges.txt") as tmp:
        tmp.write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    save_json(out_dir / "tokenizer_config.json", {
        "tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, "bos_token": BOS,
        "eos_token": EOS, "unk_token": EOS, "pad_token": EOS, "do_lower_case": True,
        "clean_up_tokenization_spaces": True})
    save_json(out_dir / "special_tokens_map.json",
              {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS})
    return out_dir


def load_tokenizer(path: str | Path):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(path))

