"""Training text, tokenized offline, in an order fixed by the step counter.

Sources: the small text bundled with moekit (``moekit/presets/data``), a local ``.txt`` file
(documents separated by blank lines) or a local ``.jsonl`` file (one ``{"text": ...}`` per line).
Tokenizers: the one in a local weights folder, or a byte-level tokenizer for the random-weight
presets (every byte is a token, so any vocabulary of 259 or more works and nothing downloads).

Sequences are packed to ``seq_len`` (documents joined by EOS and cut into equal rows, no padding)
or kept one document per row and padded per batch, as ``TrainingSetup.packing`` says. Which rows
a rank sees at a step depends only on (seed, step, micro-step, rank), so a run resumed from a
checkpoint reads exactly the batches the uninterrupted run would have read.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from moekit.errors import MoekitError

#: Labels with this value are ignored by the loss (transformers' convention).
IGNORE_INDEX = -100


class DataError(MoekitError):
    """Training data or a tokenizer that moekit cannot use; the message says what to change."""


# --------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ByteTokenizer:
    """UTF-8 bytes as tokens: byte b is id b + 3; 0 is padding, 1 begins and 2 ends a document.

    The ids 0/1/2 match the pad/bos/eos ids of moekit's presets, so a random-weight preset needs
    no tokenizer files at all.
    """

    pad_token_id: int = 0
    bos_token_id: int = 1
    eos_token_id: int = 2
    offset: int = 3

    @property
    def vocab_size(self) -> int:
        return self.offset + 256

    def encode(self, text: str) -> list[int]:
        return [self.bos_token_id] + [b + self.offset for b in text.encode("utf-8")]

    def decode(self, ids: list[int]) -> str:
        return bytes(i - self.offset for i in ids if i >= self.offset).decode("utf-8", errors="replace")


class HFTokenizer:
    """A local Hugging Face tokenizer behind the same small interface as ByteTokenizer."""

    def __init__(self, folder: str | Path) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        self.eos_token_id = self.tokenizer.eos_token_id
        self.bos_token_id = self.tokenizer.bos_token_id
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else (self.eos_token_id or 0)
        self.vocab_size = len(self.tokenizer)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def has_tokenizer(folder: str | Path | None) -> bool:
    return folder is not None and Path(folder).is_dir() and any((Path(folder) / f).is_file() for f in TOKENIZER_FILES)


def tokenizer_for(vocab_size: int, weights_folder: str | Path | None = None) -> ByteTokenizer | HFTokenizer:
    """The weights folder's own tokenizer when it has one, else the byte-level tokenizer."""
    if has_tokenizer(weights_folder):
        return HFTokenizer(weights_folder)
    tokenizer = ByteTokenizer()
    if vocab_size < tokenizer.vocab_size:
        raise DataError(
            f"the model's vocabulary has {vocab_size} tokens, fewer than the {tokenizer.vocab_size} the byte-level "
            "tokenizer needs; give a weights folder with its own tokenizer files."
        )
    return tokenizer


# --------------------------------------------------------------------------------------------
# Documents
# --------------------------------------------------------------------------------------------


def bundled_text_paths() -> list[Path]:
    """The training texts shipped with moekit, sorted."""
    folder = Path(str(resources.files("moekit") / "presets" / "data"))
    return sorted(folder.glob("*.txt"))


def load_documents(source: str | Path | None = None) -> list[str]:
    """Documents from the bundled text (None), a .txt file (blank-line separated) or a .jsonl file ("text")."""
    if source is None:
        paths = bundled_text_paths()
        if not paths:
            raise DataError("moekit's bundled training text is missing from moekit/presets/data; reinstall moekit.")
        return [doc for path in paths for doc in _paragraphs(path.read_text(encoding="utf-8"))]
    path = Path(source).expanduser()
    if not path.is_file():
        raise DataError(f"training data {path} does not exist; give a local .txt or .jsonl file, or none for the bundled text.")
    if path.suffix == ".jsonl":
        return _jsonl_texts(path)
    return _paragraphs(_read_text(path))


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"training data {path} is not UTF-8 text (byte {err.start}); save it as UTF-8.") from None


def _paragraphs(text: str) -> list[str]:
    return [" ".join(block.split()) for block in text.split("\n\n") if block.strip()]


def _jsonl_texts(path: Path) -> list[str]:
    texts = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{number} is not valid JSON: {err}") from err
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise DataError(f'{path}:{number} has no "text" string; each line must be like {{"text": "..."}}.')
        texts.append(record["text"])
    if not texts:
        raise DataError(f"{path} holds no documents.")
    return texts


# --------------------------------------------------------------------------------------------
# Rows and batches
# --------------------------------------------------------------------------------------------


@dataclass
class TokenizedData:
    """Token rows ready for batching: packed rows of exactly seq_len, or one row per document."""

    rows: list[torch.Tensor]
    packed: bool
    pad_token_id: int
    seq_len: int

    @property
    def num_rows(self) -> int:
        return len(self.rows)

    @property
    def num_tokens(self) -> int:
        return sum(len(r) for r in self.rows)

    def collate(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """input_ids, attention_mask and labels for these rows (padding ignored by the loss)."""
        rows = [self.rows[i] for i in indices]
        length = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = row
            attention_mask[i, : len(row)] = 1
        labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def tokenize(documents: list[str], tokenizer, seq_len: int, packing: bool) -> TokenizedData:
    """Tokenize documents and pack them into rows of seq_len, or cut each to at most seq_len."""
    encoded = [tokenizer.encode(doc) + [tokenizer.eos_token_id] for doc in documents]
    if packing:
        stream = torch.tensor([t for ids in encoded for t in ids], dtype=torch.long)
        num_rows = len(stream) // seq_len
        if num_rows == 0:
            raise DataError(f"the data holds {len(stream)} tokens, fewer than one packed row of seq_len={seq_len}.")
        rows = list(stream[: num_rows * seq_len].view(num_rows, seq_len))
    else:
        rows = [torch.tensor(ids[:seq_len], dtype=torch.long) for ids in encoded if len(ids) >= 2]
        if not rows:
            raise DataError("no document has two or more tokens to train on.")
    return TokenizedData(rows=rows, packed=packing, pad_token_id=tokenizer.pad_token_id, seq_len=seq_len)


@dataclass(frozen=True)
class BatchOrder:
    """Which rows each rank reads at each step: a seeded shuffle per epoch, indexed by the step counter."""

    num_rows: int
    micro_batch: int
    grad_accum: int
    world_size: int
    seed: int = 0

    def row_indices(self, step: int, micro_step: int, rank: int) -> list[int]:
        """Rows for optimizer step ``step`` (0-based), accumulation micro-step and rank."""
        first = ((step * self.grad_accum + micro_step) * self.world_size + rank) * self.micro_batch
        return [self._row_at(position) for position in range(first, first + self.micro_batch)]

    def _row_at(self, position: int) -> int:
        epoch, offset = divmod(position, self.num_rows)
        return int(_epoch_order(self.num_rows, self.seed, epoch)[offset])


@functools.lru_cache(maxsize=4)
def _epoch_order(num_rows: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled row order of one epoch (a fresh seeded permutation per epoch)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_rows, generator=generator)
