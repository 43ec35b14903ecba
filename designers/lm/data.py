"""The pretraining stream of the language-model module: corpus -> documents -> packed
sequences, resumable at the exact sequence.

- :func:`read_corpus`: NuminaMath-CoT style JSONL or parquet through the ``datasets``
  library on local files (memory-mapped Arrow; nothing is downloaded). A document has
  ``problem`` and ``solution``, or ``messages`` (the first user turn is the problem, the
  first assistant turn the solution). A file that is not JSON lines, or lacks those
  fields, is one error naming the file and the line or field.
- :func:`tokenize_document`: prompt (``data.prompt_template``) and answer
  (``data.answer_template`` + EOS) tokenised separately; labels are -100 on the prompt.
- :class:`PackedStream`: documents drawn through a seeded shuffle buffer of document
  indices (as ``datasets``' streaming ``shuffle(buffer_size)`` draws), tokenised on the
  fly and packed *whole* into fixed-length sequences.

Packing. A document is never cut to fill a sequence: one that does not fit in what is
left starts the next sequence, and the rest is padding (labels -100). Cutting would put
answer tokens in a sequence without their question, and the loss is on answers only.
A document longer than ``seq_len`` is cut into ``seq_len`` pieces (``overlong=split``,
each piece a segment of its own) or dropped (``overlong=drop``); both are counted.
Document boundaries: ``position_ids`` restart at 0 for every document (and for the
padding). With no attention mask and no cache, ``transformers`` turns restarting
positions into a block-diagonal causal mask (``masking_utils.find_packed_sequence_indices``),
so a document attends only to itself, in eager, SDPA and flash attention alike.

Resume: the stream's whole state (epoch, source cursor, the buffer's document indices,
the RNG, a pending document or piece, the counters) is a small dict; tokenisation is
deterministic, so restoring it continues with exactly the sequences an uninterrupted
run would see.
"""

from __future__ import annotations

import json
import pathlib
import random
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

import dinov  # noqa: F401  (torchvision shim first: datasets and transformers import it)
from designers.lm.config import LMDataConfig

IGNORE_INDEX = -100  # labels the loss skips (prompt tokens, padding)
SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


# ----------------------------------------------------------------------------- corpus
def _first_bad_json_line(path: pathlib.Path) -> tuple[int, str] | None:
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    return number, f"not JSON ({error.msg})"
                if not isinstance(row, dict):
                    return number, f"a JSON {type(row).__name__}, not an object"
    return None


def read_corpus(path: str | pathlib.Path) -> Any:
    """The corpus at ``path`` as a ``datasets.Dataset`` with ``problem``/``solution`` or
    ``messages`` columns; errors name the file and the line or the missing field."""
    import datasets

    path = pathlib.Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"data.path: corpus file not found: {path}")
    builder = SUFFIXES.get(path.suffix)
    if builder is None:
        raise ValueError(f"data.path: {path} must be .jsonl, .json or .parquet")
    if builder == "json":
        bad = _first_bad_json_line(path)
        if bad is not None:
            raise ValueError(f"{path}:{bad[0]}: {bad[1]}")
    try:
        dataset = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as error:  # pyarrow and datasets raise several types for a bad file
        raise ValueError(f"{path}: cannot be read as {builder}: {error}") from error
    columns = set(dataset.column_names)
    if not ({"problem", "solution"} <= columns or "messages" in columns):
        raise ValueError(f"{path}: expected 'problem' and 'solution' columns, or 'messages'; "
                         f"it has {sorted(columns)}")
    return dataset


def document_text(row: dict[str, Any], where: str) -> tuple[str, str]:
    """(problem, solution) of a corpus row; ``where`` names the file and line in errors."""
    if "messages" in row and row.get("messages") is not None and row.get("problem") is None:
        turns = {m.get("role"): m.get("content") for m in reversed(row["messages"])}
        problem, solution = turns.get("user"), turns.get("assistant")
        missing = "a user turn" if problem is None else "an assistant turn"
    else:
        problem, solution = row.get("problem"), row.get("solution")
        missing = "'problem'" if problem is None else "'solution'"
    if not isinstance(problem, str) or not isinstance(solution, str):
        raise ValueError(f"{where}: the document has no {missing}")
    return problem, solution


@dataclass
class Document:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on the prompt tokens


def tokenize_document(tokenizer: Any, problem: str, solution: str, cfg: LMDataConfig) -> Document:
    """Prompt and answer tokenised separately; the loss is on the answer (and its EOS)."""
    prompt = tokenizer(cfg.prompt_template.format(problem=problem, solution=solution),
                       add_special_tokens=False)["input_ids"]
    answer = tokenizer(cfg.answer_template.format(problem=problem, solution=solution),
                       add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return Document(prompt + answer, [IGNORE_INDEX] * len(prompt) + answer)


# ----------------------------------------------------------------------------- packing
class PackedStream:
    """Endless packed sequences of one corpus (module docstring); same on every rank."""

    def __init__(self, dataset: Any, tokenizer: Any, cfg: LMDataConfig, source: str) -> None:
        if len(dataset) == 0:
            raise ValueError(f"{source}: the corpus has no documents")
        self.dataset, self.tokenizer, self.cfg, self.source = dataset, tokenizer, cfg, source
        self.line_offset = 1 if SUFFIXES.get(pathlib.Path(source).suffix) == "json" else 0
        self.rng = random.Random(cfg.seed)
        self.epoch, self.cursor = 0, 0
        self.buffer: list[int] = []
        self.pending: tuple[int, int] | None = None  # (document, token offset) to place first
        self.stats = {"documents": 0, "overlong_split": 0, "overlong_dropped": 0,
                      "tokens": 0, "padding": 0}

    # -- the document stream
    def _next_source_index(self) -> int:
        index = self.cursor
        self.cursor += 1
        if self.cursor == len(self.dataset):
            self.epoch, self.cursor = self.epoch + 1, 0
        return index

    def _draw(self) -> int:
        """The next document index through the shuffle buffer."""
        while len(self.buffer) < min(self.cfg.shuffle_buffer, len(self.dataset)):
            self.buffer.append(self._next_source_index())
        slot = self.rng.randrange(len(self.buffer))
        index = self.buffer[slot]
        self.buffer[slot] = self._next_source_index()
        return index

    def document(self, index: int) -> Document:
        where = f"{self.source}:{index + self.line_offset}" if self.line_offset else \
            f"{self.source} row {index}"
        problem, solution = document_text(self.dataset[index], where)
        return tokenize_document(self.tokenizer, problem, solution, self.cfg)

    def _next_piece(self) -> tuple[int, int, Document]:
        """(document, offset, tokens) to place next: the pending one, else a new draw."""
        if self.pending is not None:
            index, offset = self.pending
            return index, offset, self.document(index)
        while True:
            index = self._draw()
            doc = self.document(index)
            self.stats["documents"] += 1
            if len(doc.input_ids) <= self.cfg.seq_len:
                return index, 0, doc
            if self.cfg.overlong == "split":
                self.stats["overlong_split"] += 1
                return index, 0, doc
            self.stats["overlong_dropped"] += 1

    # -- sequences
    def next_sequence(self) -> tuple[list[int], list[int], list[int]]:
        """(input_ids, labels, position_ids) of one packed sequence of ``seq_len`` tokens."""
        length = self.cfg.seq_len
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        while len(ids) < length:
            index, offset, doc = self._next_piece()
            piece = min(len(doc.input_ids) - offset, length)
            if ids and len(ids) + piece > length:  # it starts the next sequence
                self.pending = (index, offset)
                break
            ids += doc.input_ids[offset:offset + piece]
            labels += doc.labels[offset:offset + piece]
            positions += range(piece)
            rest = offset + piece
            self.pending = (index, rest) if rest < len(doc.input_ids) else None
        pad = length - len(ids)
        self.stats["tokens"] += len(ids)
        self.stats["padding"] += pad
        ids += [self.tokenizer.pad_token_id] * pad
        labels += [IGNORE_INDEX] * pad
        positions += range(pad)  # a segment of its own: no document attends to padding
        return ids, labels, positions

    def next_batch(self, size: int) -> dict[str, Tensor]:
        rows = [self.next_sequence() for _ in range(size)]
        return {key: torch.tensor([row[i] for row in rows], dtype=torch.long)
                for i, key in enumerate(("input_ids", "labels", "position_ids"))}

    # -- state
    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "cursor": self.cursor, "buffer": list(self.buffer),
                "rng": self.rng.getstate(), "pending": self.pending, "stats": dict(self.stats)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self.buffer = list(state["buffer"])
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.pending = None if state["pending"] is None else tuple(state["pending"])
        self.stats = dict(state["stats"])


def rows_of_rank(batch: dict[str, Tensor], rank: int, world_size: int,
                 micro: int) -> list[dict[str, Tensor]]:
    """This rank's micro-batches of a global batch: micro-batch ``a`` of rank ``r`` is rows
    ``(a·world + r)·micro ...`` (one process then sees the same rows, micro-batch by
    micro-batch, as all ranks together)."""
    total = batch["input_ids"].shape[0]
    steps = total // (world_size * micro)
    out = []
    for step in range(steps):
        start = (step * world_size + rank) * micro
        out.append({k: v[start:start + micro] for k, v in batch.items()})
    return out


def label_count(batch: dict[str, Tensor]) -> int:
    """Tokens the loss counts in ``batch``: labels not ignored, after the causal shift."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


# ----------------------------------------------------------------------------- feedback
def feedback_pool(path: str | pathlib.Path, size: int, seed: int) -> list[Any]:
    """``size`` GSM8K examples of the train split at ``path`` (the designer's feedback
    pool; published: 1,024), drawn without replacement with ``seed``, in file order."""
    from eval.gsm8k import read_gsm8k

    examples = read_gsm8k(path)
    if size > len(examples):
        raise ValueError(f"feedback.pool_size={size} but {path} holds {len(examples)} examples")
    chosen = sorted(random.Random(seed).sample(range(len(examples)), size))
    return [examples[i] for i in chosen]


def feedback_documents(pool: list[Any], tokenizer: Any, cfg: LMDataConfig) -> list[Document]:
    """The pool as documents of the pretraining format (question as the prompt, the worked
    answer as the answer): the feedback loss is the mean NLL of their answer tokens."""
    return [tokenize_document(tokenizer, ex.question, ex.answer, cfg) for ex in pool]
