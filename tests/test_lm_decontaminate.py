"""designers.lm.decontaminate: near-duplicates of benchmark problems leave the corpus.

Fixtures are written per test in tmp dirs. The tests marked ``needs_gsm8k`` plant variants
of real GSM8K test questions; they read the real folder (``$GSM8K_DIR``, else
``../shared/data/gsm8k`` beside the checkout) in place and skip when it is absent.
"""

from __future__ import annotations

import json
import os
import pathlib
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from designers.lm import decontaminate as dc

ROOT = pathlib.Path(__file__).resolve().parents[1]
GSM8K = pathlib.Path(os.environ.get("GSM8K_DIR") or ROOT.parent / "shared" / "data" / "gsm8k")
needs_gsm8k = pytest.mark.skipif(
    not (GSM8K / "test.jsonl").is_file(),
    reason=f"real GSM8K not found at {GSM8K}/test.jsonl (set GSM8K_DIR to its folder)")

# MATH-style benchmark problems for the tests that do not need the real data
MATH = [
    "Let $f(x) = 3x^2 - 5x + 7$. What is the value of $f(4)$ when evaluated carefully?",
    "A rectangle has a perimeter of 30 units and its length is twice its width. "
    "What is the area of the rectangle in square units?",
    "How many positive divisors does the number 360 have, counting 1 and the number itself?",
]
UNRELATED = [
    "A baker fills 14 trays with muffins, 9 muffins per tray. How many muffins are baked?",
    "Sam reads 23 pages on Monday and twice as many on Tuesday. How many pages in all?",
    "A garden hose fills a 300 litre tank at 12 litres per minute. How long does it take?",
]


def write_jsonl(path: pathlib.Path, rows: list[dict]) -> pathlib.Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def run(tmp_path: pathlib.Path, corpus: pathlib.Path, against: list[pathlib.Path],
        **settings) -> dict:
    settings = {"workers": 1, **settings}
    return dc.decontaminate(corpus, against, tmp_path / "out", dc.Settings(**settings),
                            cache_dir=str(tmp_path / "cache"))


def reword_numbers(text: str) -> str:
    """Every number replaced by another, digits by words and number words by digits."""
    text = re.sub(r"\b(two|three|four|five|twice)\b", "7", text)
    return re.sub(r"\d+(?:[.,]\d+)*", lambda m: "twenty-one" if len(m.group()) % 2 else "93",
                  text)


def restyle(text: str) -> str:
    """Case, whitespace and punctuation changed, words untouched."""
    return "  ".join(text.upper().replace(",", "").replace("?", " ?!").split(" "))


def append_sentence(text: str) -> str:
    return text + " Explain your reasoning step by step."


# ---------------------------------------------------------------------------- text


def test_normalize_numbers_case_punctuation_whitespace():
    assert dc.normalize("Janet’s ducks lay 16 eggs,  per day!") == \
        dc.normalize("JANET'S DUCKS LAY sixteen EGGS per\tday")
    assert dc.normalize("It costs $1,250.50 or twenty-five") == ["it", "costs", "0", "or", "0"]
    assert dc.normalize("ｆｕｌｌ width ２ digits") == ["full", "width", "0", "digits"]  # NFKC


def test_shingles_of_short_text_is_one_shingle():
    assert dc.shingles(["a", "b", "c"], 5) == ["a b c"]
    assert dc.shingles([], 5) == []
    assert dc.shingles(list("abcdef"), 5) == ["a b c d e", "b c d e f"]
    assert dc.jaccard({"x", "y"}, {"y", "z"}) == pytest.approx(1 / 3)


# ---------------------------------------------------------------------------- real GSM8K


def planted_corpus(questions: list[str]) -> tuple[list[dict], list[bool]]:
    """Three variants of each question plus unrelated problems, interleaved; and which rows
    are planted."""
    rows, planted = [], []
    topic_rewrites = [  # the topics of test questions 0, 1, 3 with new wording: kept
        "A farmer's hens produce 16 eggs daily. Three are eaten at breakfast and four go "
        "into baking. If each leftover egg sells for $2, what is the farmer's daily income?",
        "To sew one robe you need 2 bolts of blue cloth plus half as much white cloth. "
        "What is the total number of bolts needed?",
        "Each week James does 3 sessions of 3 sprints, with every sprint being 60 meters "
        "long. Find his weekly running distance in meters.",
    ]
    unrelated = topic_rewrites + UNRELATED + [
        f"A library shelf holds {n} novels and {n + 4} atlases. After lending out {n // 2} "
        f"novels, how many books are left on the shelf in room {n}?" for n in range(10, 30)]
    for i, question in enumerate(questions):
        for variant in (reword_numbers, restyle, append_sentence):
            rows.append({"problem": variant(question), "solution": f"planted {i}",
                         "source": "planted"})
            planted.append(True)
        rows.append({"problem": unrelated[i], "solution": "kept", "source": "other"})
        planted.append(False)
    for text in unrelated[len(questions):]:
        rows.append({"problem": text, "solution": "kept", "source": "other"})
        planted.append(False)
    return rows, planted


@needs_gsm8k
def test_planted_gsm8k_near_duplicates_are_removed(tmp_path):
    test_file = GSM8K / "test.jsonl"
    questions = [json.loads(line)["question"] for line in test_file.read_text().splitlines()[:20]]
    rows, planted = planted_corpus(questions)
    corpus = write_jsonl(tmp_path / "numina.jsonl", rows)
    report = run(tmp_path, corpus, [test_file])

    assert report["counts"] == {"read": 86, "removed": 60, "kept": 26}
    assert report["benchmarks"][str(test_file)] == {"problems": 1319, "removed": 60}
    kept_lines = (tmp_path / "out" / "numina.jsonl").read_text().splitlines()
    original = corpus.read_text().splitlines()
    assert kept_lines == [line for line, p in zip(original, planted, strict=True) if not p]
    pairs = report["closest_pairs"]
    assert len(pairs) == 20 and all(p["removed"] and p["jaccard"] >= 0.5 for p in pairs)
    assert [p["jaccard"] for p in pairs] == sorted((p["jaccard"] for p in pairs), reverse=True)
    assert pairs[0]["benchmark_file"] == str(test_file)
    assert pairs[0]["benchmark_text"] == questions[pairs[0]["benchmark_row"]][:300]


@needs_gsm8k
def test_two_workers_match_one(tmp_path):
    test_file = GSM8K / "test.jsonl"
    questions = [json.loads(line)["question"] for line in test_file.read_text().splitlines()[:20]]
    corpus = write_jsonl(tmp_path / "numina.jsonl", planted_corpus(questions)[0])
    one = run(tmp_path / "one", corpus, [test_file], workers=1)
    two = run(tmp_path / "two", corpus, [test_file], workers=2, chunk_size=7)
    assert one["counts"] == two["counts"] and one["closest_pairs"] == two["closest_pairs"]
    assert (tmp_path / "one/out/numina.jsonl").read_bytes() == \
        (tmp_path / "two/out/numina.jsonl").read_bytes()


# ---------------------------------------------------------------------------- formats


def math_benchmarks(tmp_path: pathlib.Path) -> list[pathlib.Path]:
    """MATH-style benchmarks, one JSON Lines and one parquet file."""
    jsonl = write_jsonl(tmp_path / "math_a.jsonl", [{"problem": MATH[0], "solution": "s"}])
    parquet = tmp_path / "math_b.parquet"
    pq.write_table(pa.table({"problem": MATH[1:], "solution": ["s", "t"]}), parquet)
    return [jsonl, parquet]


def test_parquet_round_trip_keeps_schema_and_order(tmp_path):
    problems = [UNRELATED[0], reword_numbers(MATH[1]), UNRELATED[1], MATH[2].lower(),
                UNRELATED[2], append_sentence(MATH[0])]
    table = pa.table({"problem": problems, "solution": [f"s{i}" for i in range(6)],
                      "source": ["a", "b", "c", "d", "e", "f"], "id": list(range(6))})
    corpus = tmp_path / "numina.parquet"
    pq.write_table(table, corpus)
    report = run(tmp_path, corpus, math_benchmarks(tmp_path))

    kept = pq.read_table(tmp_path / "out" / "numina.parquet")
    assert kept.schema.names == table.schema.names
    assert kept.schema.types == table.schema.types
    assert kept.to_pylist() == table.take([0, 2, 4]).to_pylist()
    assert report["counts"] == {"read": 6, "removed": 3, "kept": 3}
    assert {f: b["removed"] for f, b in report["benchmarks"].items()} == {
        str(tmp_path / "math_a.jsonl"): 1, str(tmp_path / "math_b.parquet"): 2}
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.endswith(".tmp")]


def test_jsonl_rows_are_copied_verbatim(tmp_path):
    corpus = tmp_path / "numina.jsonl"
    compact = {"separators": (",", ":")}  # formatting a rewrite would not keep
    lines = [json.dumps({"problem": UNRELATED[0], "solution": "x", "extra": [1, 2]}),
             json.dumps({"solution": "y", "problem": restyle(MATH[0])}),
             "",  # a blank line is no row and is not copied
             json.dumps({"solution": "z", "problem": UNRELATED[1]}, **compact)]
    corpus.write_text("\n".join(lines))  # and no newline at the end
    report = run(tmp_path, corpus, math_benchmarks(tmp_path))
    assert report["counts"] == {"read": 3, "removed": 1, "kept": 2}
    assert (tmp_path / "out" / "numina.jsonl").read_text() == f"{lines[0]}\n{lines[3]}\n"


def test_messages_format_compares_the_user_turn(tmp_path):
    def chat(user: str, assistant: str) -> dict:
        return {"messages": [{"role": "system", "content": "You are a math tutor."},
                             {"role": "user", "content": user},
                             {"role": "assistant", "content": assistant}]}

    rows = [chat(reword_numbers(MATH[2]), "There are 24."),
            chat(UNRELATED[0], MATH[1]),  # a benchmark problem in the answer: not compared
            chat(UNRELATED[1], "46 pages.")]
    corpus = write_jsonl(tmp_path / "chat.jsonl", rows)
    report = run(tmp_path, corpus, math_benchmarks(tmp_path))
    assert report["counts"] == {"read": 3, "removed": 1, "kept": 2}
    kept = [json.loads(line) for line in (tmp_path / "out/chat.jsonl").read_text().splitlines()]
    assert kept == rows[1:]
    assert report["closest_pairs"][0]["corpus_text"] == reword_numbers(MATH[2])


def test_lsh_candidates_are_verified_by_exact_jaccard(tmp_path):
    words = "red green blue cyan pink gray gold teal navy lime plum rose".split()
    benchmark = " ".join(words)
    # 9 shingles against 8, 5 of them shared: exact 5-gram Jaccard 5 / 12
    near = " ".join(words[:9] + ["another", "warm", "shade", "here"])
    exact = dc.jaccard(set(dc.shingles(dc.normalize(near), 5)),
                       set(dc.shingles(dc.normalize(benchmark), 5)))
    assert exact == pytest.approx(5 / 12)
    against = [write_jsonl(tmp_path / "bench.jsonl", [{"problem": benchmark}])]
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"problem": near}])

    index = dc.BenchmarkIndex.from_texts({"b": [benchmark]}, dc.Settings(lsh_threshold=0.1))
    sketch = next(dc._minhashes([dc.shingles(dc.normalize(near), 5)], index.settings))
    assert index.lsh.query(sketch) == [0]  # the LSH proposes the pair ...
    report = run(tmp_path, corpus, against, lsh_threshold=0.1, threshold=0.5)
    assert report["candidates"]["documents"] == 1  # ... and verification keeps it
    assert report["counts"]["removed"] == 0
    assert report["closest_pairs"][0]["jaccard"] == round(exact, 4)
    assert not report["closest_pairs"][0]["removed"]
    lower = run(tmp_path / "low", corpus, against, lsh_threshold=0.1, threshold=0.35)
    assert lower["counts"]["removed"] == 1


def test_report_and_cli_line(tmp_path, capsys):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"problem": t} for t in [*UNRELATED, MATH[0]]])
    against = math_benchmarks(tmp_path)
    out = tmp_path / "out"
    code = dc.main(["--corpus", str(corpus), "--against", *map(str, against), "--out", str(out),
                    "--ngram", "4", "--num-perm", "64", "--threshold", "0.6",
                    "--lsh-threshold", "0.4", "--workers", "1",
                    "--cache-dir", str(tmp_path / "cache")])
    assert code == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("decontaminate: 4 read, 1 removed, 3 kept (best 4-gram Jaccard >= 0.6)")
    report = json.loads((out / "report.json").read_text())
    assert report["counts"] == {"read": 4, "removed": 1, "kept": 3}
    settings = report["settings"]
    assert (settings["ngram"], settings["num_perm"], settings["threshold"],
            settings["lsh_threshold"]) == (4, 64, 0.6, 0.4)
    assert settings["lsh_bands"] * settings["lsh_rows"] <= 64
    assert 0 < settings["lsh_recall_at_threshold"] <= 1
    assert report["documents_per_second"] > 0 and report["seconds"]["total"] > 0
    assert report["closest_pairs"][0]["corpus_row"] == 3
    assert report["closest_pairs"][0]["jaccard"] == 1.0


# ---------------------------------------------------------------------------- bad input


def fails(tmp_path, capsys, corpus: pathlib.Path, against: list[pathlib.Path]) -> str:
    """Run the CLI on bad input: it exits 2 with one error line and writes nothing."""
    code = dc.main(["--corpus", str(corpus), "--against", *map(str, against),
                    "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")])
    assert code == 2
    assert not (tmp_path / "out").exists()
    error = capsys.readouterr().err.strip()
    assert error.startswith("decontaminate: error: ") and "\n" not in error
    return error


def test_bad_json_line_names_file_and_line(tmp_path, capsys):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"problem": "a"}\n\n{"problem": oops}\n')
    error = fails(tmp_path, capsys, corpus, math_benchmarks(tmp_path))
    assert f"{corpus}:3: not valid JSON" in error


def test_corpus_row_without_problem_names_line_and_field(tmp_path, capsys):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"problem": "a", "solution": "b"},
                                                {"solution": "no problem here"}])
    error = fails(tmp_path, capsys, corpus, math_benchmarks(tmp_path))
    assert f"{corpus}:2:" in error and "'problem'" in error and "'messages'" in error


def test_messages_without_user_turn_names_line_and_field(tmp_path, capsys):
    corpus = write_jsonl(tmp_path / "c.jsonl", [
        {"messages": [{"role": "user", "content": "q"}]},
        {"messages": [{"role": "assistant", "content": "only an answer"}]}])
    error = fails(tmp_path, capsys, corpus, math_benchmarks(tmp_path))
    assert f"{corpus}:2:" in error and "'messages' user turn" in error


def test_gsm8k_row_without_question_names_line_and_field(tmp_path, capsys):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"problem": "a"}])
    gsm8k = write_jsonl(tmp_path / "gsm8k.jsonl", [
        {"question": "q1", "answer": "#### 1"}, {"question": "q2", "answer": "#### 2"},
        {"answer": "#### 3"}])
    error = fails(tmp_path, capsys, corpus, [gsm8k])
    assert f"{gsm8k}:3: row has no field 'question'" in error


def test_missing_files_are_named(tmp_path, capsys):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"problem": "a"}])
    error = fails(tmp_path, capsys, corpus, [tmp_path / "gone.jsonl", tmp_path / "lost.parquet"])
    assert "gone.jsonl" in error and "lost.parquet" in error


def test_parquet_row_without_problem_names_row(tmp_path, capsys):
    corpus = tmp_path / "c.parquet"
    pq.write_table(pa.table({"problem": ["a", None], "solution": ["s", "t"]}), corpus)
    error = fails(tmp_path, capsys, corpus, math_benchmarks(tmp_path))
    assert f"{corpus}: row 1:" in error and "'problem'" in error


def test_refuses_to_overwrite_the_corpus(tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"problem": "a"}])
    with pytest.raises(dc.InputError, match="overwrite"):
        dc.decontaminate(corpus, math_benchmarks(tmp_path), tmp_path, dc.Settings())
