"""Offline character-level text: ``python_docs``, the reference text of Python's own ``help()`` topics.

The text is the standard library's ``pydoc_data.topics`` (every topic, in sorted order, joined by blank lines:
about 465,000 characters and 103 symbols on Python 3.11; the exact text follows the Python version). Nothing is
downloaded. :func:`char_windows` turns any string into the language_model task's samples:

* a contiguous split, the first 90 % for training and the rest for testing (no shuffling: nearby text is alike);
* the vocabulary is the sorted characters of the training split, plus one unknown symbol (index V) that every
  character found only in the test split maps to, so the model has V + 1 outputs;
* samples are windows of ``context + 1`` characters with stride ``context`` (the inputs of two windows do not
  overlap): the input is the first ``context`` ids, the target the ``context`` ids one step later;
* int64 ``TensorDataset`` s, so the seeded batch order, the eval subsets and the sample batches work unchanged.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import TensorDataset

TEST_FRACTION = 0.1
DEFAULT_CONTEXT = 64


def python_docs_text() -> str:
    """The help-topic texts of ``pydoc_data.topics`` in sorted topic order, separated by blank lines."""
    from pydoc_data.topics import topics
    return "\n\n".join(topics[name].strip("\n") for name in sorted(topics)) + "\n"


def encode(text: str, vocabulary: str) -> torch.Tensor:
    """int64 ids of ``text``: a character's index in ``vocabulary``, ``len(vocabulary)`` for any other character."""
    index = {c: i for i, c in enumerate(vocabulary)}
    unknown = len(vocabulary)
    return torch.tensor([index.get(c, unknown) for c in text], dtype=torch.int64)


def windows(ids: torch.Tensor, context: int) -> TensorDataset:
    """Windows of ``context + 1`` ids with stride ``context``: inputs ``ids[i·c : i·c + c]``, targets shifted by
    one; (N, context) each, N = (len(ids) − 1) // context (the tail that fills no window is dropped)."""
    n = (len(ids) - 1) // context
    if n < 1:
        raise ValueError(f"a text of {len(ids)} characters holds no window of context + 1 = {context + 1}")
    starts = torch.arange(n) * context
    rows = starts[:, None] + torch.arange(context + 1)  # (N, context + 1)
    cut = ids[rows]
    return TensorDataset(cut[:, :-1].contiguous(), cut[:, 1:].contiguous())


def char_windows(text: str, context: int = DEFAULT_CONTEXT,
                 test_fraction: float = TEST_FRACTION) -> tuple[TensorDataset, TensorDataset, str]:
    """Split ``text`` (contiguous, the test split last), build the vocabulary from the training split and cut both
    splits into windows (see the module docstring).

    Returns:
        (train, test, vocabulary): the vocabulary is a string of the training split's sorted characters; the
        model's output dimension is ``len(vocabulary) + 1`` (the last id is the unknown symbol). Each split also
        carries ``vocabulary`` as an attribute, for decoding.

    Raises:
        ValueError: context < 1, a fraction outside (0, 1), or a split too short for one window.
    """
    if context < 1 or not 0 < test_fraction < 1:
        raise ValueError(f"need context >= 1 and 0 < test_fraction < 1, got context={context}, "
                         f"test_fraction={test_fraction}")
    cut = round(len(text) * (1 - test_fraction))
    train_text, test_text = text[:cut], text[cut:]
    vocabulary = "".join(sorted(set(train_text)))
    train, test = (windows(encode(part, vocabulary), context) for part in (train_text, test_text))
    train.vocabulary = test.vocabulary = vocabulary
    return train, test, vocabulary


def decode(ids: torch.Tensor, vocabulary: str, unknown: str = "\ufffd") -> str:
    """The text of a 1-D tensor of ids (the unknown symbol as ``unknown``)."""
    return "".join(vocabulary[i] if i < len(vocabulary) else unknown for i in ids.tolist())


def load_python_docs(root: str | Path | None = None, download: bool = False, seed: int = 0,
                     context: int = DEFAULT_CONTEXT) -> tuple[TensorDataset, TensorDataset, int]:
    """The ``python_docs`` data set: (train, test, vocabulary size + 1). ``root``, ``download`` and ``seed`` are
    unused (the text is local; the split is contiguous, so no seed enters it)."""
    train, test, vocabulary = char_windows(python_docs_text(), context)
    return train, test, len(vocabulary) + 1
