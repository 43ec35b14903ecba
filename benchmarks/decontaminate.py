"""Decontamination throughput: documents per second of ``designers.lm.decontaminate`` end to
end (read + check, index, MinHash + LSH + exact verification, write), projected to
NuminaMath-CoT's ~860k documents.

Prints one JSON line. The corpus is generated here: arithmetic word problems of 4-9
sentences (about NuminaMath-CoT problem length) with a step-by-step solution, written as
JSON Lines in the NuminaMath layout (``problem``, ``solution``, ``source``); 1% of the
documents are planted variants (numbers reworded, a sentence appended) of benchmark
problems, so the verification path does real work. The benchmarks are the real GSM8K
train + test (``$GSM8K_DIR``, else ``../shared/data/gsm8k`` beside the checkout; 8,792
problems) when present, else 8,792 generated problems.

Each ``--workers`` setting runs once on the same files (a fresh datasets cache each, so
every run pays the JSON-to-arrow conversion a first run pays). ``projected_seconds_860k``
takes the fastest setting: its index time once, the rest scaled to 860k documents.

Usage: ``python benchmarks/decontaminate.py [--documents 100000] [--workers 1 2]``
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import sys
import tempfile
import time

import dinov  # noqa: F401  (torchvision shim first)

# isort: split
from designers.lm import decontaminate as dc

NUMINA_DOCUMENTS = 860_000
ROOT = pathlib.Path(__file__).resolve().parents[1]
NAMES = ["Ava", "Liam", "Noor", "Mateo", "Yuki", "Priya", "Omar", "Greta", "Kofi", "Lena",
         "Ravi", "Sofia", "Tariq", "Mei", "Jonas", "Amara", "Diego", "Ingrid", "Hugo", "Zara"]
ITEMS = ["apples", "marbles", "stickers", "pencils", "cupcakes", "books", "seashells", "coins",
         "tickets", "plants", "candles", "bracelets", "postcards", "batteries", "jars"]
PLACES = ["market", "school fair", "garage sale", "bakery", "library", "harbour", "workshop"]
PERIODS = ["day", "week", "month", "weekend", "morning"]
SENTENCES = [
    "{n} has {a} {item} stored in a box at the {place}.",
    "Every {period}, {n} buys {b} more {item} for ${c} each.",
    "{m} gives {n} {d} {item} as a birthday present.",
    "After {e} {period}s, {p}% of the {item} are sold at the {place}.",
    "The remaining {item} are packed into bags of {f}, and each bag sells for ${c}.",
    "{n} also spends ${g} on a new shelf and ${b} on paint for it.",
    "On the way home, {d} of the {item} break and must be thrown away.",
    "{m} has three times as many {item} as {n} had at the start.",
    "A delivery adds {a} {item}, but {e} of them are the wrong colour and go back.",
    "The {place} charges a fee of ${f} for every {period} that {n} rents a table.",
]
QUESTIONS = [
    "How many {item} does {n} have at the end?",
    "How much money, in dollars, does {n} earn in total?",
    "How many more {item} does {m} have than {n}?",
    "What is the total cost of everything {n} bought?",
]


def word_problem(rng: random.Random) -> str:
    values = {"n": rng.choice(NAMES), "m": rng.choice(NAMES), "item": rng.choice(ITEMS),
              "place": rng.choice(PLACES), "period": rng.choice(PERIODS),
              "p": rng.choice([10, 20, 25, 40, 50, 75]),
              **{k: rng.randint(2, 400) for k in "abcdefg"}}
    sentences = rng.sample(SENTENCES, rng.randint(4, 9)) + [rng.choice(QUESTIONS)]
    return " ".join(s.format(**values) for s in sentences)


def solution(rng: random.Random) -> str:
    steps = [f"Step {i}: {rng.randint(2, 99)} + {rng.randint(2, 99)} = {rng.randint(4, 198)}."
             for i in range(1, rng.randint(4, 12))]
    return " ".join(steps) + f" The answer is $\\boxed{{{rng.randint(1, 999)}}}$."


def benchmark_files(folder: pathlib.Path, rng: random.Random) -> list[pathlib.Path]:
    gsm8k = pathlib.Path(os.environ.get("GSM8K_DIR") or ROOT.parent / "shared/data/gsm8k")
    files = [gsm8k / "train.jsonl", gsm8k / "test.jsonl"]
    if all(path.is_file() for path in files):
        return files
    generated = folder / "benchmark.jsonl"
    generated.write_text("".join(json.dumps({"question": word_problem(rng), "answer": "#### 1"})
                                 + "\n" for _ in range(8792)))
    return [generated]


def write_corpus(path: pathlib.Path, documents: int, benchmark: list[str],
                 rng: random.Random) -> tuple[float, int]:
    """The corpus; returns its mean problem length in words and how many rows are planted."""
    words = planted = 0
    with open(path, "w") as handle:
        for _ in range(documents):
            if rng.random() < 0.01:  # planted: a benchmark problem, numbers and ending changed
                problem = rng.choice(benchmark).replace("5", "7") + " Show all your work."
                planted += 1
            else:
                problem = word_problem(rng)
            words += len(problem.split())
            row = {"problem": problem, "solution": solution(rng), "source": "synthetic"}
            handle.write(json.dumps(row) + "\n")
    return words / documents, planted


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=100_000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    dc.datasets.disable_progress_bars()
    result: dict = {"documents": args.documents}
    with tempfile.TemporaryDirectory() as tmp:
        folder = pathlib.Path(tmp)
        against = benchmark_files(folder, rng)
        benchmark = [text for path in against
                     for text in dc.benchmark_problems(dc.load_rows(path, tmp).data.table, path)]
        started = time.perf_counter()
        mean_words, planted = write_corpus(folder / "numina.jsonl", args.documents, benchmark,
                                           rng)
        result["mean_problem_words"] = round(mean_words, 1)
        result["planted"] = planted  # each should be removed; "removed" counts all removals
        result["generate_seconds"] = round(time.perf_counter() - started, 2)
        result["benchmark_problems"] = len(benchmark)
        result["benchmark_is_real_gsm8k"] = against[0].name == "train.jsonl"
        for workers in args.workers:
            report = dc.decontaminate(folder / "numina.jsonl", against, folder / f"out{workers}",
                                      dc.Settings(workers=workers),
                                      cache_dir=str(folder / f"cache{workers}"))
            result[f"workers_{workers}"] = {
                "documents_per_second": report["documents_per_second"],
                "match_documents_per_second": report["match_documents_per_second"],
                "removed": report["counts"]["removed"], "seconds": report["seconds"]}
    best = max(args.workers, key=lambda w: result[f"workers_{w}"]["documents_per_second"])
    seconds = result[f"workers_{best}"]["seconds"]
    result["best_documents_per_second"] = result[f"workers_{best}"]["documents_per_second"]
    # the index is built once whatever the corpus size; everything else grows with it
    scale = NUMINA_DOCUMENTS / args.documents
    result["projected_seconds_860k"] = round(
        seconds["index"] + (seconds["total"] - seconds["index"]) * scale, 1)
    result["cpu_count"] = os.cpu_count()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
