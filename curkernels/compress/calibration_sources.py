"""Where calibration text comes from, and how it becomes model-input batches.

Sources: a list of strings, a text file (one sample a non-empty line), a Hugging Face
`datasets` name (online; 'name' or 'name:config'), or — when none is given — the offline
default: English prose from the docstrings of Python's own standard library, which ships
with every interpreter, so compression works on a machine with no network and no data. For a
model whose tokenizer has a chat template, half of the default samples are chat exchanges in
that template, built from the same paragraphs.

`unit="sentence"` calibrates on the sentences of those texts instead of whole texts. A
sentence encoder embeds single sentences; calibrated on paragraphs cut at the sequence
length, it only ever sees paragraph openings (all-MiniLM-L6-v2 at keep 0.5, SVD-LLM: STS-B
dev 82.8 from WikiText lines, 84.1 from the same lines' sentences; bench/results).
"""

import importlib
import inspect
import itertools
import re
from collections.abc import Iterable
from pathlib import Path

import torch

# Stdlib modules whose documentation is mostly full-sentence prose.
_DEFAULT_TEXT_MODULES = ("argparse", "collections", "contextlib", "csv", "dataclasses",
                         "datetime", "decimal", "difflib", "email.message", "fractions",
                         "functools", "heapq", "http.client", "inspect", "json", "logging",
                         "pathlib", "pickle", "random", "shutil", "statistics", "string",
                         "subprocess", "tarfile", "textwrap", "threading",
                         "unittest", "urllib.parse", "zipfile")


# What the user asks in a chat-formatted default sample: about the object whose docstring
# paragraph the assistant answers with (the first paragraph, then later ones).
_CHAT_QUESTIONS = ("What does {name} in Python's {module} module do?",
                   "Tell me more about {name} from Python's {module} module.")


def _docstring_paragraphs(min_words: int) -> list[tuple[str, str, str, bool]]:
    """(module, object name, paragraph, first paragraph of its docstring?) for the prose
    paragraphs of the stdlib docstrings, in a fixed order, each paragraph once (subclasses
    inherit their parent's docstring: argparse's Action classes would fill the first hundred
    samples with ten paragraphs)."""
    found, seen = [], set()
    for module_name in _DEFAULT_TEXT_MODULES:
        module = importlib.import_module(module_name)
        objects = [module] + [obj for _, obj in sorted(vars(module).items())
                              if (inspect.isclass(obj) or inspect.isfunction(obj))
                              and getattr(obj, "__module__", None) == module.__name__]
        for obj in objects:
            first = True
            for paragraph in (inspect.getdoc(obj) or "").split("\n\n"):
                text = " ".join(paragraph.split())
                if len(text.split()) >= min_words and not text.startswith((">>>", "$")) \
                        and text not in seen:
                    seen.add(text)
                    name = module_name if obj is module else obj.__qualname__
                    found.append((module_name, name, text, first))
                    first = False
    return found


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def default_calibration_texts(num_samples: int = 256, min_words: int = 12, *,
                              tokenizer=None) -> list[str]:
    """Prose paragraphs from stdlib docstrings (deterministic for a Python version). With a
    `tokenizer` that has a chat template (an instruct model), every other sample is a chat
    exchange in that template — the user asks about the object, the assistant answers with the
    paragraph — so the template's tokens and the assistant turn are calibrated too: calibrated
    on prose alone, a compressed chat model answers chat prompts with garbage. Either way the
    i-th sample comes from the i-th paragraph."""
    paragraphs = _docstring_paragraphs(min_words)[:num_samples]
    if not paragraphs:
        raise RuntimeError("found no docstring prose in the standard library (python -OO?): "
                           "pass calibration text explicitly")
    chat = has_chat_template(tokenizer)
    texts = []
    for i, (module, name, text, first) in enumerate(paragraphs):
        if chat and i % 2:
            question = _CHAT_QUESTIONS[0 if first else 1].format(name=name, module=module)
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": question}, {"role": "assistant", "content": text}],
                tokenize=False)
        texts.append(text)
    return texts


_SENTENCE_BREAK = re.compile(r'(?<=[.!?])\s+(?=[A-Z"])')
UNITS = ("text", "sentence")


def split_sentences(texts: Iterable[str], min_words: int = 4) -> list[str]:
    """The sentences of `texts`, in order: a break after '.', '!' or '?' where the next word
    starts with a capital or a quote ("H. americanus" stays whole); pieces of fewer than
    `min_words` words (short headings, fragments) are dropped."""
    return [sentence for text in texts for sentence in _SENTENCE_BREAK.split(text.strip())
            if len(sentence.split()) >= min_words]


def read_text_file(path: str | Path, num_samples: int) -> list[str]:
    lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    texts = [line for line in lines if line]
    if not texts:
        raise ValueError(f"calibration file {str(path)!r} holds no non-empty line")
    return texts[:num_samples]


def load_dataset_texts(name: str, num_samples: int, split: str = "train",
                       column: str = "text") -> list[str]:
    try:
        import datasets
    except ImportError as err:
        raise ImportError("a datasets name as calibration source needs `pip install "
                          "datasets` (or curkernels[data])") from err
    path, _, config = name.partition(":")
    data = datasets.load_dataset(path, config or None, split=split)
    if column not in data.column_names:
        raise ValueError(f"dataset {name!r} has no column {column!r}; it has "
                         f"{data.column_names}")
    texts = []
    for row in data:
        text = row[column].strip()
        if text:
            texts.append(text)
            if len(texts) == num_samples:
                break
    return texts


def calibration_texts(source=None, num_samples: int = 256, *, split: str = "train",
                      column: str = "text", unit: str = "text", tokenizer=None) -> list[str]:
    """Texts from a list of strings, a text-file path, a datasets name, or the offline
    default (source None; half of it chat exchanges when `tokenizer` has a chat template,
    see `default_calibration_texts`): `num_samples` of them, or with `unit="sentence"`
    `num_samples` sentences (`split_sentences`) of as many texts as it takes (prose only)."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples}")
    if unit not in UNITS:
        raise ValueError(f"unit must be one of {UNITS}, got {unit!r}")
    if unit == "sentence":
        sentences = []
        # a text holds at least one sentence or none: read more texts until there are enough
        for wanted in itertools.count():
            texts = _source_texts(source, num_samples << wanted, split, column, None)
            sentences = split_sentences(texts)
            if len(sentences) >= num_samples or len(texts) < num_samples << wanted:
                break
        if not sentences:
            raise ValueError(f"calibration source {source!r} holds no sentence of 4 words or "
                             f"more")
        return sentences[:num_samples]
    return _source_texts(source, num_samples, split, column, tokenizer)


def _source_texts(source, num_samples: int, split: str, column: str, tokenizer) -> list[str]:
    if source is None:
        return default_calibration_texts(num_samples, tokenizer=tokenizer)
    if isinstance(source, (list, tuple)):
        if not source or not all(isinstance(t, str) for t in source):
            raise ValueError("calib as a list must hold at least one string")
        return list(source[:num_samples])
    if isinstance(source, Path) or Path(str(source)).is_file():
        return read_text_file(source, num_samples)
    if isinstance(source, str):
        parent = Path(source).parent
        looks_like_path = source.endswith((".txt", ".text")) or (
            parent != Path(".") and parent.is_dir())  # 'org/name' datasets have no such folder
        if looks_like_path:
            raise FileNotFoundError(f"calibration file {source!r} does not exist")
        return load_dataset_texts(source, num_samples, split, column)
    raise TypeError(f"calibration source must be a list of strings, a file path, a datasets "
                    f"name or None, got {type(source).__name__}")


def tokenize_batches(texts: list[str], tokenizer, *, seq_len: int = 256,
                     batch_size: int = 16) -> list[dict]:
    """Padded, truncated `input_ids` / `attention_mask` batches, texts grouped by length
    (the statistics do not depend on the order, and similar lengths pad little)."""
    if tokenizer is None:
        raise ValueError("calibration from text needs tokenizer=")
    if tokenizer.pad_token is None:  # decoder tokenizers often have none; pads are masked
        tokenizer.pad_token = tokenizer.eos_token
    texts = sorted(texts, key=len, reverse=True)
    batches = []
    for start in range(0, len(texts), batch_size):
        encoded = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True,
                            truncation=True, max_length=seq_len)
        batches.append({"input_ids": encoded["input_ids"],
                        "attention_mask": encoded["attention_mask"]})
    return batches


def as_batches(calib, tokenizer=None, *, seq_len: int = 256, batch_size: int = 16,
               num_samples: int | None = None) -> list[dict]:
    """What `compress(calib=...)` accepts, as a list of input dicts (methods make several
    passes). Strings (or a source `calibration_texts` reads, cut to `num_samples` texts) need
    `tokenizer`; dicts must hold `input_ids`."""
    for name, value in (("seq_len", seq_len), ("batch_size", batch_size),
                        ("num_samples", 1 if num_samples is None else num_samples)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if isinstance(calib, (str, Path)):
        calib = calibration_texts(calib, num_samples or 256)
    if isinstance(calib, (list, tuple)) and calib and all(isinstance(t, str) for t in calib):
        texts = list(calib[:num_samples] if num_samples else calib)
        return tokenize_batches(texts, tokenizer, seq_len=seq_len, batch_size=batch_size)
    if not isinstance(calib, Iterable) or isinstance(calib, (dict, torch.Tensor)):
        raise TypeError(f"calib must be an iterable of input dicts or a list of strings, got "
                        f"{type(calib).__name__}")
    batches = list(calib)
    if not batches:
        raise ValueError("calib is empty: give at least one batch")
    for i, batch in enumerate(batches):
        if not isinstance(batch, dict) or "input_ids" not in batch:
            raise TypeError(f"calib[{i}] must be a dict with 'input_ids' (and "
                            f"'attention_mask'), got {type(batch).__name__}")
    return batches


def check_token_ids(batches: list[dict], model) -> None:
    """Every calibration token id indexes the model's input embedding: ids from another
    model's tokenizer would otherwise fail deep in the embedding lookup."""
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if not isinstance(embedding, torch.nn.Embedding):
        return
    vocab = embedding.num_embeddings
    for i, batch in enumerate(batches):
        ids = batch["input_ids"]
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
            bad = int(ids.max()) if int(ids.max()) >= vocab else int(ids.min())
            raise ValueError(f"calib[{i}] holds token id {bad}, outside the model's vocabulary "
                             f"of {vocab} ids (0..{vocab - 1}): was calib tokenized for "
                             f"another model?")
