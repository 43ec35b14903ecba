"""Corpus decontamination: remove pretraining documents that are near-duplicates of benchmark
problems (GSM8K, MATH) before the LM sees them.

``python -m designers.lm.decontaminate --corpus C --against F [F ...] --out DIR`` reads a
NuminaMath-CoT style corpus (JSON Lines ``.jsonl``/``.json`` or ``.parquet``; one document per
row with ``problem`` + ``solution``, or ``messages`` = ``[{role, content}, ...]``), compares
each document's **problem** (the question part: ``problem``, else the first ``user`` turn of
``messages``; solutions are never compared) against every benchmark problem (GSM8K
``question``, MATH-style ``problem``), and writes to ``DIR``:

- the kept corpus under the corpus's own file name, in its input format: JSON Lines rows are
  copied byte for byte (same keys, same order), parquet rows keep the input schema;
- ``report.json``: counts (read / removed / kept), settings, timings and documents per second,
  and the 20 closest pairs (corpus row, benchmark file + row, Jaccard, both texts truncated).
  Rows are 0-based dataset indices; error messages give 1-based file lines.

Method. A text is normalised (unicode NFKC, lowercase, every number -- digits like ``1,250.5``
and number words like ``sixteen`` -- replaced by one placeholder, runs of placeholders merged
so ``twenty-five`` and ``25`` agree, punctuation dropped, whitespace collapsed) and cut into
word n-grams (a text shorter than n words is one shingle of all its words). Benchmark
problems go into a ``datasketch.MinHashLSH`` index of ``LeanMinHash`` sketches; each corpus
problem's MinHash (``MinHash.generator`` + ``update_batch``, CRC32 shingle hashes) proposes
candidates, and every candidate is **verified with the exact n-gram Jaccard**. A document is
removed when its best exact Jaccard against any benchmark problem is ``>= threshold``; the
LSH only ever proposes, so a pair it proposes below the threshold is kept.

Defaults, measured on the real GSM8K (300 test questions against all 7,473 train questions):

- ``ngram=5``: the best train match of a *different* problem has median exact Jaccard 0.02,
  99th percentile 0.20, max 0.44, while a question with a sentence appended scores >= 0.61
  and one with one word changed >= 0.47 (10th percentile 0.63). 3-grams push the unrelated
  tail up (p99 0.33); 8-grams let a one-word edit fall to 0.16.
- ``threshold=0.5``: above that unrelated tail, below nearly every planted variant. Over
  the whole train split against the test split it removes 3 train questions, each a test
  question with names and numbers changed (Jaccard 0.55-0.83); the next two (0.44, 0.39) are
  siblings of one template (a different final question; "cans" for "tins"), then 0.26 and
  below. Removing a few borderline documents costs nothing next to ~860k, a leaked test
  problem costs the evaluation: for a stricter cut use ``--threshold 0.35
  --lsh-threshold 0.2``.
- ``lsh_threshold=0.3``, ``num_perm=128``: datasketch picks 37 bands x 3 rows, so a pair
  with exact Jaccard 0.5 becomes a candidate with probability 0.993 (0.9999 at 0.6);
  ``report.json`` records this recall at the chosen threshold for any setting.

Numbers are a single placeholder on purpose: "16 eggs ... $2" reworded to "20 eggs ... $3"
is the same test problem. The price is that very short problems differing only in their
numbers (``Compute 8 choose 4`` vs ``Compute 10 choose 5``) match too; they are removed,
which is the safe side for an evaluation.

Speed: ~10k documents/s per process for ~90-word problems (normalising, shingling and the
37 LSH band lookups cost about the same each); ``--workers`` processes (default: all cores)
split the corpus in chunks, so 860k documents take about a minute on 2 cores
(``benchmarks/decontaminate.py``).

Bad input is reported before any work, as one error naming the file, the 1-based line
(parquet: the 0-based row) and the field.
"""

from __future__ import annotations

import dinov  # noqa: F401  (torchvision shim first: datasets may import torchvision)

# isort: split
import argparse
import collections
import heapq
import json
import multiprocessing
import os
import pathlib
import re
import sys
import time
import unicodedata
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasketch import LeanMinHash, MinHash, MinHashLSH

from dinov.checkpoint import atomic_write_text

JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
REPORT_NAME = "report.json"
CLOSEST_PAIRS = 20
TRUNCATE_CHARS = 300

# Cardinal number words: reworded numbers ("sixteen" for "16") become the same placeholder.
_NUMBER_WORDS = frozenset((
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen twenty thirty forty fifty sixty seventy "
    "eighty ninety hundred thousand million billion"
).split())
# A token is a number (digits with inner "." or ",": 1,250.5) or a run of letters; every other
# character (punctuation, symbols, whitespace, "_") only separates tokens.
_TOKEN = re.compile(r"\d+(?:[.,]\d+)*|[^\W\d_]+")
NUMBER_TOKEN = "0"


class InputError(ValueError):
    """A missing or malformed input; the message names the file, line (or row) and field."""


@dataclass(frozen=True)
class Settings:
    ngram: int = 5
    num_perm: int = 128
    lsh_threshold: float = 0.3
    threshold: float = 0.5
    workers: int = 1
    chunk_size: int = 4096  # documents per task sent to a worker process
    seed: int = 1  # MinHash permutation seed; the index and the queries must share it

    def validate(self) -> None:
        if self.ngram < 1:
            raise ValueError(f"ngram must be >= 1, got {self.ngram}")
        if self.num_perm < 2:
            raise ValueError(f"num_perm must be >= 2, got {self.num_perm}")
        if not 0.0 < self.lsh_threshold < 1.0:
            raise ValueError(f"lsh_threshold must be in (0, 1), got {self.lsh_threshold}")
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold}")
        if self.workers < 1 or self.chunk_size < 1:
            raise ValueError(f"workers and chunk_size must be >= 1, got {self.workers}, "
                             f"{self.chunk_size}")


# ---------------------------------------------------------------------------- text


def normalize(text: str) -> list[str]:
    """The words of ``text`` after NFKC and lowercasing, without punctuation, every run of
    numbers one placeholder (so "twenty-five" and "25" agree)."""
    words: list[str] = []
    for token in _TOKEN.findall(unicodedata.normalize("NFKC", text).lower()):
        if token[0].isdigit() or token in _NUMBER_WORDS:
            if not words or words[-1] != NUMBER_TOKEN:
                words.append(NUMBER_TOKEN)
        else:
            words.append(token)
    return words


def shingles(words: Sequence[str], n: int) -> list[str]:
    """Word n-grams; a text shorter than ``n`` words is one shingle of all its words."""
    if len(words) < n:
        return [" ".join(words)] if words else []
    return [" ".join(words[i:i + n]) for i in range(len(words) - n + 1)]


def jaccard(a: set[str] | frozenset[str], b: set[str] | frozenset[str]) -> float:
    if not a or not b:
        return 0.0
    inter = len(a & b)
    return inter / (len(a) + len(b) - inter)


def _minhashes(shingle_lists: Sequence[Sequence[str]], settings: Settings) -> Iterator[MinHash]:
    # CRC32 is a C call per shingle, ~2x faster than datasketch's default SHA1 here, and
    # deterministic across processes (Python's hash() is salted per process). datasketch
    # mixes every input hash with the Murmur3 finaliser before permuting, so CRC32's
    # linearity does not bias the sketches.
    encoded = ([s.encode() for s in shingle_list] for shingle_list in shingle_lists)
    return MinHash.generator(encoded, num_perm=settings.num_perm, seed=settings.seed,
                             hashfunc=zlib.crc32)


# ---------------------------------------------------------------------------- reading


def _kind(path: pathlib.Path) -> str:
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return "json"
    if suffix in PARQUET_SUFFIXES:
        return "parquet"
    raise InputError(f"{path}: unknown file type {suffix!r}; expected "
                     f"{', '.join(JSONL_SUFFIXES + PARQUET_SUFFIXES)}")


def _jsonl_rows(path: pathlib.Path) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw line) of every non-blank line: one row each, as
    ``datasets``' JSON reader counts them (blank lines are no rows)."""
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                yield number, line


def location(path: pathlib.Path, row: int) -> str:
    """``file:line`` of a 0-based dataset row (JSON Lines), or ``file: row N`` (parquet)."""
    if _kind(path) == "json":
        for index, (number, _) in enumerate(_jsonl_rows(path)):
            if index == row:
                return f"{path}:{number}"
    return f"{path}: row {row}"


def _first_bad_json_line(path: pathlib.Path) -> str | None:
    for number, line in _jsonl_rows(path):
        try:
            value = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            return f"{path}:{number}: not valid JSON ({error})"
        if not isinstance(value, dict):
            return f"{path}:{number}: a row must be a JSON object, got {type(value).__name__}"
    return None


def load_rows(path: pathlib.Path, cache_dir: str | None = None) -> datasets.Dataset:
    """One local JSON Lines or parquet file as a ``datasets.Dataset`` (nothing downloaded)."""
    kind = _kind(path)
    if kind == "json":
        with open(path, "rb") as handle:
            head = handle.read(4096).lstrip()
        if head.startswith(b"["):  # a JSON array has no lines to report or copy
            raise InputError(f"{path}:1: a JSON array; give one JSON object per line (JSON Lines)")
    try:
        return datasets.load_dataset(kind, data_files=str(path), split="train",
                                     cache_dir=cache_dir)
    except Exception as error:  # datasets wraps parse errors without naming the line
        found = _first_bad_json_line(path) if kind == "json" else None
        raise InputError(found or f"{path}: cannot be read as {kind}: {error}") from error


def _text_column(table: pa.Table, name: str, path: pathlib.Path) -> pa.ChunkedArray | None:
    if name not in table.column_names:
        return None
    column = table.column(name)
    if pa.types.is_null(column.type):  # every row null: the field is missing everywhere
        return pa.chunked_array([pa.nulls(len(column), pa.large_string())])
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        raise InputError(f"{path}: field {name!r} must be text, found {column.type}")
    return column.cast(pa.large_string())


def _user_turns(column: pa.ChunkedArray, path: pathlib.Path) -> pa.ChunkedArray:
    """Each row's first ``user`` message content; null where a row has none."""
    type_ = column.type
    if not (pa.types.is_list(type_) or pa.types.is_large_list(type_)) or \
            not pa.types.is_struct(type_.value_type) or \
            {"role", "content"} - {f.name for f in type_.value_type}:
        raise InputError(f"{path}: field 'messages' must be a list of {{role, content}}, "
                         f"found {type_}")
    pieces = []
    for chunk in column.chunks:
        flat = chunk.flatten()  # the chunk's messages in order (slicing and null lists handled)
        parents = pc.list_parent_indices(chunk).to_numpy()
        is_user = pc.fill_null(pc.equal(pc.struct_field(flat, "role"), "user"), False)
        user_at = np.flatnonzero(is_user.to_numpy(zero_copy_only=False))
        rows, first = np.unique(parents[user_at], return_index=True)
        take = np.full(len(chunk), -1, dtype=np.int64)
        take[rows] = user_at[first]
        contents = pc.struct_field(flat, "content")
        if not (pa.types.is_string(contents.type) or pa.types.is_large_string(contents.type)):
            raise InputError(f"{path}: field 'messages.content' must be text, found "
                             f"{contents.type}")
        pieces.append(contents.take(pa.array(take, mask=take < 0)).cast(pa.large_string()))
    return pa.chunked_array(pieces, type=pa.large_string())


def _first_null(column: pa.ChunkedArray) -> int | None:
    if column.null_count == 0:
        return None
    return int(np.flatnonzero(pc.is_null(column).to_numpy(zero_copy_only=False))[0])


def corpus_problems(table: pa.Table, path: pathlib.Path) -> pa.ChunkedArray:
    """The problem text of every corpus row: ``problem``, else the first user turn."""
    problem = _text_column(table, "problem", path)
    user = _user_turns(table.column("messages"), path) \
        if "messages" in table.column_names else None
    if problem is None and user is None:
        raise InputError(f"{location(path, 0)}: no field 'problem' or 'messages' (the corpus "
                         f"needs one of them)")
    if problem is None or user is None:
        texts = problem if user is None else user
    else:
        texts = pc.coalesce(problem, user)
    missing = _first_null(texts)
    if missing is not None:
        raise InputError(f"{location(path, missing)}: row has no field 'problem' and no "
                         f"'messages' user turn")
    return texts


def benchmark_problems(table: pa.Table, path: pathlib.Path) -> list[str]:
    """GSM8K ``question`` or MATH-style ``problem`` of every benchmark row."""
    for name in ("question", "problem"):  # GSM8K files are recognised by their question field
        column = _text_column(table, name, path)
        if column is None:
            continue
        missing = _first_null(column)
        if missing is not None:
            raise InputError(f"{location(path, missing)}: row has no field {name!r}")
        return column.to_pylist()
    raise InputError(f"{location(path, 0)}: no field 'question' (GSM8K) or 'problem' (MATH)")


def check_files(corpus: pathlib.Path, against: Sequence[pathlib.Path],
                out: pathlib.Path) -> None:
    missing = [str(p) for p in (corpus, *against) if not p.is_file()]
    if missing:
        raise InputError(f"missing input file(s): {', '.join(missing)}")
    for path in (corpus, *against):
        _kind(path)
    if (out / corpus.name).resolve() == corpus.resolve():
        raise InputError(f"{out}: the output would overwrite the corpus {corpus}; "
                         f"choose another --out")


# ---------------------------------------------------------------------------- matching


@dataclass(frozen=True)
class BenchmarkProblem:
    file: str
    row: int  # 0-based row of the benchmark file
    text: str
    shingles: frozenset[str]


@dataclass(frozen=True)
class Match:
    """The best verified benchmark problem of one corpus document that had LSH candidates."""

    row: int  # 0-based corpus row
    jaccard: float  # exact n-gram Jaccard, not the MinHash estimate
    problem: int  # index into BenchmarkIndex.problems
    candidates: int  # how many benchmark problems the LSH proposed


class BenchmarkIndex:
    """Benchmark problems, their exact shingle sets and a MinHash LSH over them."""

    def __init__(self, problems: list[BenchmarkProblem], settings: Settings) -> None:
        self.problems = problems
        self.settings = settings
        self.lsh = MinHashLSH(threshold=settings.lsh_threshold, num_perm=settings.num_perm)
        indexed = [key for key, problem in enumerate(problems) if problem.shingles]
        sketches = _minhashes([list(problems[key].shingles) for key in indexed], settings)
        with self.lsh.insertion_session() as session:
            for key, sketch in zip(indexed, sketches, strict=True):
                session.insert(key, LeanMinHash(sketch), check_duplication=False)

    @classmethod
    def from_texts(cls, benchmarks: dict[str, list[str]], settings: Settings) -> BenchmarkIndex:
        problems = [
            BenchmarkProblem(file, row, text, frozenset(shingles(normalize(text), settings.ngram)))
            for file, texts in benchmarks.items() for row, text in enumerate(texts)
        ]
        return cls(problems, settings)

    def recall_at(self, jaccard_value: float) -> float:
        """Probability that a pair with this Jaccard shares an LSH band: 1 - (1 - J^r)^b."""
        return 1.0 - (1.0 - jaccard_value ** self.lsh.r) ** self.lsh.b

    def match(self, start: int, texts: Sequence[str]) -> list[Match]:
        """Best exact-Jaccard benchmark problem of each text the LSH finds candidates for."""
        shingle_lists = [shingles(normalize(text), self.settings.ngram) for text in texts]
        sketches = _minhashes(shingle_lists, self.settings)
        found = []
        for offset, (shingle_list, sketch) in enumerate(zip(shingle_lists, sketches, strict=True)):
            if not shingle_list:  # no words: nothing to be a duplicate of
                continue
            candidates = self.lsh.query(sketch)
            if not candidates:
                continue
            own = set(shingle_list)
            # verification: the LSH only proposes; ties go to the first benchmark problem
            best, negative_key = max(
                (jaccard(own, self.problems[key].shingles), -key) for key in candidates)
            found.append(Match(start + offset, best, -negative_key, len(candidates)))
        return found


_WORKER_INDEX: BenchmarkIndex | None = None


def _init_worker(index: BenchmarkIndex) -> None:
    global _WORKER_INDEX
    _WORKER_INDEX = index


def _match_in_worker(start: int, texts: list[str]) -> list[Match]:
    assert _WORKER_INDEX is not None, "worker started without _init_worker"
    return _WORKER_INDEX.match(start, texts)


def match_corpus(problems: pa.ChunkedArray, index: BenchmarkIndex) -> list[Match]:
    """``index.match`` over the corpus in chunks, in ``settings.workers`` processes."""
    size, workers = index.settings.chunk_size, index.settings.workers
    starts = range(0, len(problems), size)

    def texts(start: int) -> list[str]:
        return problems.slice(start, size).to_pylist()

    if workers == 1 or len(problems) <= size:
        return [match for start in starts for match in index.match(start, texts(start))]
    # fork: workers inherit the index instead of unpickling it and skip re-importing torch;
    # they run only Python, numpy and datasketch, never the arrow threads of the parent.
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    found: list[Match] = []
    with context.Pool(workers, initializer=_init_worker, initargs=(index,)) as pool:
        pending: collections.deque = collections.deque()
        for start in starts:
            pending.append(pool.apply_async(_match_in_worker, (start, texts(start))))
            if len(pending) >= 2 * workers:  # bounded: the corpus is never all in flight
                found.extend(pending.popleft().get())
        while pending:
            found.extend(pending.popleft().get())
    return found


# ---------------------------------------------------------------------------- writing


def _write_jsonl(corpus: pathlib.Path, keep: np.ndarray, handle) -> None:
    count = 0
    for count, (_, line) in enumerate(_jsonl_rows(corpus), start=1):
        if keep[count - 1]:
            handle.write(line if line.endswith(b"\n") else line + b"\n")
    if count != len(keep):  # the raw lines must be the rows datasets read
        raise RuntimeError(f"{corpus}: {count} non-blank lines but {len(keep)} rows were read")


def write_kept(corpus: pathlib.Path, rows: datasets.Dataset, keep: np.ndarray,
               out: pathlib.Path) -> pathlib.Path:
    """The kept rows under ``out / corpus.name``, in the corpus's format, written atomically
    (temporary file beside the target, fsync, ``os.replace``)."""
    out.mkdir(parents=True, exist_ok=True)
    target = out / corpus.name
    tmp = out / f".{corpus.name}.{os.getpid()}.tmp"
    try:
        if _kind(corpus) == "json":
            with open(tmp, "wb") as handle:  # raw lines: same keys, key order and formatting
                _write_jsonl(corpus, keep, handle)
                handle.flush()
                os.fsync(handle.fileno())
        else:
            rows.select(np.flatnonzero(keep)).to_parquet(str(tmp))
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    return target


def _truncate(text: str) -> str:
    return text if len(text) <= TRUNCATE_CHARS else text[:TRUNCATE_CHARS] + "..."


def closest_pairs(matches: list[Match], index: BenchmarkIndex,
                  problems: pa.ChunkedArray) -> list[dict]:
    pairs = []
    for match in heapq.nlargest(CLOSEST_PAIRS, matches, key=lambda m: (m.jaccard, -m.row)):
        problem = index.problems[match.problem]
        pairs.append({
            "corpus_row": match.row,
            "benchmark_file": problem.file,
            "benchmark_row": problem.row,
            "jaccard": round(match.jaccard, 4),
            "removed": match.jaccard >= index.settings.threshold,
            "corpus_text": _truncate(problems[match.row].as_py()),
            "benchmark_text": _truncate(problem.text),
        })
    return pairs


# ---------------------------------------------------------------------------- the run


def _report(corpus: pathlib.Path, benchmarks: dict[str, list[str]], target: pathlib.Path,
            index: BenchmarkIndex, problems: pa.ChunkedArray, matches: list[Match],
            seconds: dict[str, float]) -> dict:
    settings = index.settings
    removed = [m for m in matches if m.jaccard >= settings.threshold]
    by_file = collections.Counter(index.problems[m.problem].file for m in removed)
    read = len(problems)
    return {
        "corpus": str(corpus),
        "output": str(target),
        "compared_field": "problem (else the first user turn of messages)",
        "counts": {"read": read, "removed": len(removed), "kept": read - len(removed)},
        "benchmarks": {file: {"problems": len(texts), "removed": by_file.get(file, 0)}
                       for file, texts in benchmarks.items()},
        "settings": {**asdict(settings), "lsh_bands": index.lsh.b, "lsh_rows": index.lsh.r,
                     "lsh_recall_at_threshold": round(index.recall_at(settings.threshold), 6),
                     "hash": "crc32", "number_token": NUMBER_TOKEN},
        "candidates": {"pairs": sum(m.candidates for m in matches),
                       "documents": len(matches),
                       "documents_kept_after_verification": len(matches) - len(removed)},
        "seconds": {name: round(value, 3) for name, value in seconds.items()},
        "documents_per_second": round(read / max(seconds["total"], 1e-9), 1),
        "match_documents_per_second": round(read / max(seconds["match"], 1e-9), 1),
        "closest_pairs": closest_pairs(matches, index, problems),
    }


def decontaminate(corpus: str | pathlib.Path, against: Sequence[str | pathlib.Path],
                  out: str | pathlib.Path, settings: Settings = Settings(),
                  cache_dir: str | None = None) -> dict:
    """Write ``out/<corpus name>`` without the near-duplicates of ``against`` and
    ``out/report.json``; returns the report. Every input is read and checked first."""
    settings.validate()
    corpus, out = pathlib.Path(corpus), pathlib.Path(out)
    against = [pathlib.Path(path) for path in against]
    if not against:
        raise InputError("no benchmark files given (--against)")
    started = time.perf_counter()
    check_files(corpus, against, out)
    rows = load_rows(corpus, cache_dir)
    problems = corpus_problems(rows.data.table, corpus)
    benchmarks = {str(path): benchmark_problems(load_rows(path, cache_dir).data.table, path)
                  for path in against}
    loaded = time.perf_counter()
    index = BenchmarkIndex.from_texts(benchmarks, settings)
    indexed = time.perf_counter()
    matches = match_corpus(problems, index)
    matched = time.perf_counter()
    keep = np.ones(len(problems), dtype=bool)
    keep[[m.row for m in matches if m.jaccard >= settings.threshold]] = False
    target = write_kept(corpus, rows, keep, out)
    finished = time.perf_counter()
    seconds = {"load": loaded - started, "index": indexed - loaded, "match": matched - indexed,
               "write": finished - matched, "total": finished - started}
    report = _report(corpus, benchmarks, target, index, problems, matches, seconds)
    atomic_write_text(out / REPORT_NAME, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return report


def summary_line(report: dict) -> str:
    counts, settings = report["counts"], report["settings"]
    return (f"decontaminate: {counts['read']} read, {counts['removed']} removed, "
            f"{counts['kept']} kept (best {settings['ngram']}-gram Jaccard >= "
            f"{settings['threshold']}) in {report['seconds']['total']:.1f} s, "
            f"{report['documents_per_second']:.0f} docs/s -> {report['output']}")


def _parser() -> argparse.ArgumentParser:
    defaults = Settings()
    parser = argparse.ArgumentParser(
        prog="python -m designers.lm.decontaminate",
        description="Remove corpus documents whose problem is a near-duplicate of a benchmark "
                    "problem (MinHash LSH candidates, verified by exact word n-gram Jaccard).")
    parser.add_argument("--corpus", required=True, type=pathlib.Path,
                        help="NuminaMath-CoT style .jsonl/.json/.parquet (problem or messages)")
    parser.add_argument("--against", required=True, nargs="+", type=pathlib.Path,
                        help="benchmark files: GSM8K (question) or MATH-style (problem)")
    parser.add_argument("--out", required=True, type=pathlib.Path,
                        help="output folder: the kept corpus and report.json")
    parser.add_argument("--ngram", type=int, default=defaults.ngram)
    parser.add_argument("--num-perm", type=int, default=defaults.num_perm)
    parser.add_argument("--lsh-threshold", type=float, default=defaults.lsh_threshold,
                        help="MinHash LSH threshold proposing candidates (below --threshold)")
    parser.add_argument("--threshold", type=float, default=defaults.threshold,
                        help="remove a document whose best exact n-gram Jaccard is >= this")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="processes computing MinHashes (default: all cores)")
    parser.add_argument("--chunk-size", type=int, default=defaults.chunk_size)
    parser.add_argument("--cache-dir", default=None,
                        help="datasets cache folder (default: the datasets default)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    settings = Settings(ngram=args.ngram, num_perm=args.num_perm,
                        lsh_threshold=args.lsh_threshold, threshold=args.threshold,
                        workers=args.workers, chunk_size=args.chunk_size)
    try:
        settings.validate()
    except ValueError as error:
        parser.error(str(error))
    datasets.disable_progress_bars()
    try:
        report = decontaminate(args.corpus, args.against, args.out, settings, args.cache_dir)
    except InputError as error:
        print(f"decontaminate: error: {error}", file=sys.stderr)
        return 2
    print(summary_line(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
