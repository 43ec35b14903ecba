"""GSM8K evaluation (eval.gsm8k): lm-eval's answer extraction and metric, the few-shot
prompt, the reader's errors, batched greedy generation, and end-to-end runs on the tiny
offline model (:mod:`designers.lm.synthetic`): a Hugging Face directory, a LoRA adapter
directory and a checkpoint of the LM trainer. The real GSM8K (``$GSM8K_DIR``, else
``../shared/data/gsm8k`` beside the checkout) is only read, and its test skips when absent.
"""

from __future__ import annotations

import json
import os
import pathlib
import random
import re

import numpy as np
import pytest
import torch

import dinov  # noqa: F401  (torchvision shim first: transformers imports torchvision)
from dinov.config import ConfigError, load_config
from eval import gsm8k
from eval.gsm8k import (
    FALLBACK,
    GSM8KEvalConfig,
    GSM8KExample,
    GSM8KFormatError,
    GSM8KGenerationConfig,
    GSM8KPromptConfig,
    build_prompts,
    encode_prompts,
    flexible_answer,
    format_prompt,
    generate_all,
    generate_batch,
    is_correct,
    normalise,
    pass_at_1,
    read_gsm8k,
    strict_answer,
    truncate_at_stop,
)
from eval.lm import LMModelConfig, LoRAConfig, apply_lora, load_causal_lm, trainable_state

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "eval" / "gsm8k.yaml"
GSM8K = pathlib.Path(os.environ.get("GSM8K_DIR") or ROOT.parent / "shared" / "data" / "gsm8k")
CPU = torch.device("cpu")

# lm-eval 0.4.13 gsm8k.yaml, copied here on purpose: the reference the module must equal
LM_EVAL_STRICT = "#### (\\-?[0-9\\.\\,]+)"
LM_EVAL_FLEXIBLE = "(-?[$0-9.,]{2,})|(-?[0-9]+)"
LM_EVAL_IGNORE = [",", "\\$", "(?s).*#### ", "\\.$"]


def lm_eval_filter(text: str, pattern: str, group_select: int) -> str:
    """lm-eval's RegexFilter on one response, as its code does it (findall, group_select,
    first non-empty group of a tuple, strip, "[invalid]")."""
    match = re.compile(pattern).findall(text)
    if not match:
        return "[invalid]"
    match = match[group_select]
    if isinstance(match, tuple):
        match = [m for m in match if m]
        match = match[0] if match else "[invalid]"
    return match.strip()


def lm_eval_exact_match(predictions: list[str], references: list[str]) -> float:
    """lm-eval's exact_match_hf_evaluate with the gsm8k settings (numpy, as it runs)."""
    preds, refs = np.asarray(predictions), np.asarray(references)
    for s in LM_EVAL_IGNORE:
        preds = np.array([re.sub(s, "", x) for x in preds])
        refs = np.array([re.sub(s, "", x) for x in refs])
    return float(np.mean(np.char.lower(preds) == np.char.lower(refs)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, one_thread) -> dict[str, pathlib.Path]:
    from designers.lm.synthetic import write_default

    return write_default(tmp_path_factory.mktemp("gsm8k_tiny"), n_corpus=200, n_train=60,
                         n_test=24)


@pytest.fixture(scope="module")
def lively(tiny, tmp_path_factory) -> pathlib.Path:
    """The tiny model with large random matrices: its greedy text varies from token to
    token (the default initialisation repeats one token), so equalities mean something."""
    model, tokenizer = load_causal_lm(LMModelConfig(path=str(tiny["model"])))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim == 2:
                parameter.normal_(0.0, 0.3, generator=generator)
    out = tmp_path_factory.mktemp("lively")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def write_lines(path: pathlib.Path, lines: list[str]) -> pathlib.Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def row(question: str, answer: str) -> str:
    return json.dumps({"question": question, "answer": answer})


# ----------------------------------------------------------------------- answers


@pytest.mark.parametrize(("text", "expected"), [
    ("She has 3+4=7 apples.\n#### 7", "7"),
    ("#### 1,234", "1,234"),
    ("#### -5 degrees", "-5"),
    ("#### 3.50", "3.50"),
    ("so #### 12.", "12."),
    ("#### 4\nQuestion: ... #### 9", "4"),            # the first #### wins
    ("The answer is 42.", FALLBACK),                  # no #### at all
    ("####42", FALLBACK),                              # the space is part of the pattern
    ("#### $18", FALLBACK),                            # a $ is not a strict number
    ("", FALLBACK),
])
def test_strict_answer(text, expected):
    assert strict_answer(text) == expected


@pytest.mark.parametrize(("text", "expected"), [
    ("3 boxes of 4 make 12 apples", "12"),            # the last number wins
    ("It costs $1,234.", "$1,234."),
    ("The temperature is -5", "-5"),
    ("He pays $3.50 in all", "$3.50"),
    ("#### 7 but then 8", "8"),
    ("x 5", "5"),                                      # a single digit: the second group
    ("answer: 5.", "5."),                              # two characters: the first group
    ("no number here", FALLBACK),
    ("..", ".."),                                      # lm-eval's pattern takes it, too
])
def test_flexible_answer(text, expected):
    assert flexible_answer(text) == expected


@pytest.mark.parametrize(("prediction", "reference", "correct"), [
    ("1,234", "so...\n#### 1234", True),
    ("$18.", "#### 18", True),
    ("-5", "#### -5", True),
    ("3.50", "#### 3.5", False),                       # string equality, as lm-eval
    ("12.", "#### 12", True),                          # one trailing period removed
    (FALLBACK, "#### 7", False),
    ("7", "Steps 3+4=7.\n#### 7", True),
])
def test_is_correct_normalises_both_sides(prediction, reference, correct):
    assert is_correct(prediction, reference) is correct


def test_pass_at_1_counts_strict_and_flexible():
    completions = [" 3+4=7\n#### 7", " He has 9 apples.", " #### 1,080.", " none", " #### 5\n#### 6"]
    refs = ["#### 7", "#### 9", "#### 1,080", "#### 3", "#### 6"]
    strict = [strict_answer(c) for c in completions]
    flexible = [flexible_answer(c) for c in completions]
    assert strict == ["7", FALLBACK, "1,080.", FALLBACK, "5"]
    assert flexible == ["7", "9", "1,080.", FALLBACK, "6"]
    assert pass_at_1(strict, refs) == pytest.approx(40.0)
    assert pass_at_1(flexible, refs) == pytest.approx(80.0)
    with pytest.raises(ValueError):
        pass_at_1([], [])


def random_completions(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    pieces = ["#### ", "####", "$", "-", ",", ".", " ", "\n", "Answer", "Question:", "x", "1",
              "23", "0", "4.5", "1,000", "-7", "$3", ".\n", "#### -", "##"]
    return ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 12))) for _ in range(n)]


def test_answers_and_metric_equal_lm_evals_regexes():
    """On hand-written and 3,000 random strings: the filters equal lm-eval's patterns
    applied the way its RegexFilter applies them, and Pass@1 equals its exact_match."""
    texts = ["#### 1,234", "$1,234.50.", "-3 and -4.", "no answer", "#### 5.\n#### 6",
             *random_completions(3000, seed=0)]
    refs = [f"steps\n#### {random.Random(i).choice(['5', '1,234', '-4', '6', '7'])}"
            for i in range(len(texts))]
    for name, mine, pattern, group in (("strict", strict_answer, LM_EVAL_STRICT, 0),
                                       ("flexible", flexible_answer, LM_EVAL_FLEXIBLE, -1)):
        ours = [mine(t) for t in texts]
        theirs = [lm_eval_filter(t, pattern, group) for t in texts]
        assert ours == theirs, name
        assert pass_at_1(ours, refs) == pytest.approx(100 * lm_eval_exact_match(theirs, refs))
        assert [normalise(r) for r in refs] == [re.sub(r"(?s).*#### ", "", r).replace(",", "")
                                               for r in refs]


@pytest.mark.skipif(not os.environ.get("LM_EVAL_SRC"),
                    reason="set LM_EVAL_SRC to an unpacked lm-eval (0.4.13) to compare with it")
def test_answers_equal_lm_evals_own_filter_and_sampler(monkeypatch):
    monkeypatch.syspath_prepend(os.environ["LM_EVAL_SRC"])
    from lm_eval.api.samplers import ContextSampler
    from lm_eval.filters.extraction import RegexFilter

    texts = random_completions(2000, seed=1)
    for mine, pattern, group in ((strict_answer, LM_EVAL_STRICT, 0),
                                 (flexible_answer, LM_EVAL_FLEXIBLE, -1)):
        theirs = RegexFilter(regex_pattern=pattern, group_select=group).apply(
            [[t] for t in texts], texts)
        assert [mine(t) for t in texts] == [r[0] for r in theirs]
    docs = [{"question": f"q{i}", "answer": f"#### {i}"} for i in range(50)]
    sampler = ContextSampler(docs, rnd=1234)
    expected = [[int(d["answer"][5:]) for d in sampler.sample(n=5)] for _ in range(7)]
    assert gsm8k.fewshot_ids(50, 7, 5, "per_question", 1234) == expected


# ------------------------------------------------------------------------ prompts


def test_fewshot_prompt_text_is_exact():
    train = [GSM8KExample(0, "What is 1+1?", "1+1=<<1+1=2>>2\n#### 2"),
             GSM8KExample(1, "Tom has 3 cats.", "#### 3"),
             GSM8KExample(2, "Ann buys 4.", "4*1=4\n#### 4")]
    cfg = GSM8KPromptConfig(num_fewshot=2)
    assert format_prompt("How many?", [train[2], train[0]], cfg) == (
        "Question: Ann buys 4.\nAnswer: 4*1=4\n#### 4\n\n"
        "Question: What is 1+1?\nAnswer: 1+1=<<1+1=2>>2\n#### 2\n\n"
        "Question: How many?\nAnswer:")
    assert format_prompt("{x}?", [], cfg) == "Question: {x}?\nAnswer:"   # braces stay text
    test = [GSM8KExample(i, f"Q{i}", "#### 1") for i in range(4)]
    prompts, ids = build_prompts(test, train, cfg)
    rng = random.Random(1234)   # lm-eval: one RNG, one draw of 2 per question, in order
    assert ids == [rng.sample(range(3), 2) for _ in range(4)]
    assert prompts[3] == format_prompt("Q3", [train[i] for i in ids[3]], cfg)
    fixed = GSM8KPromptConfig(num_fewshot=2, fewshot_sampling="fixed", seed=5)
    _, fixed_ids = build_prompts(test, train, fixed)
    assert fixed_ids == [random.Random(5).sample(range(3), 2)] * 4
    zero_shot, _ = build_prompts(test, [], GSM8KPromptConfig(num_fewshot=0))
    assert zero_shot[0] == "Question: Q0\nAnswer:"
    with pytest.raises(ConfigError, match="prompt.num_fewshot"):
        build_prompts(test, train, GSM8KPromptConfig(num_fewshot=4))


@pytest.mark.parametrize(("override", "key"), [
    ("prompt.fewshot_sampling=random", "prompt.fewshot_sampling"),
    ("prompt.num_fewshot=-1", "prompt.num_fewshot"),
    ("prompt.question_template=Q: {q}", "prompt.question_template"),
    ("prompt.answer_template=A", "prompt.answer_template"),
    ("generation.batch_size=0", "generation.batch_size"),
    ("generation.max_new_tokens=0", "generation.max_new_tokens"),
    ("data.limit=0", "data.limit"),
    ("precision=fp16", "precision"),
    ("device=gpu", "device"),
    ("model.dtype=float16", "model.dtype"),
])
def test_config_errors_name_the_key(override, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config(CONFIG, [override], schema=GSM8KEvalConfig)


def test_shipped_config_is_the_lm_eval_task():
    cfg = load_config(CONFIG, [], schema=GSM8KEvalConfig)
    assert cfg.prompt == GSM8KPromptConfig()
    assert (cfg.prompt.num_fewshot, cfg.prompt.seed, cfg.generation.max_new_tokens) == (5, 1234, 256)
    assert cfg.generation.stop == ["Question:", "</s>", "<|im_end|>"]


# ------------------------------------------------------------------------- reader


@pytest.mark.parametrize(("line", "field"), [
    ("{not json", "not valid JSON"),
    ('["a list"]', "expected a JSON object"),
    ('{"answer": "#### 3"}', "field 'question' is missing"),
    ('{"question": "q"}', "field 'answer' is missing"),
    ('{"question": 3, "answer": "#### 3"}', "field 'question' must be text"),
    ('{"question": "q", "answer": "it is 3"}', "field 'answer' must end with '#### <number>'"),
    ('{"question": "q", "answer": "#### three"}', "field 'answer' must end with '#### <number>'"),
])
def test_reader_errors_name_file_line_and_field(tmp_path, line, field):
    path = write_lines(tmp_path / "test.jsonl", [row("q", "#### 1"), "", line])
    with pytest.raises(GSM8KFormatError) as caught:
        read_gsm8k(path)
    assert str(caught.value).startswith(f"{path}:3: ")
    assert field in str(caught.value)


def test_reader_reads_and_missing_file(tmp_path):
    path = write_lines(tmp_path / "ok.jsonl", [row("q1", "a\n#### 1,080"), row("q2", "#### -4 \n")])
    examples = read_gsm8k(path)
    assert [(e.index, e.question, e.target) for e in examples] == [(0, "q1", "1080"), (1, "q2", "-4 \n")]
    with pytest.raises(FileNotFoundError, match="absent.jsonl"):
        read_gsm8k(tmp_path / "absent.jsonl")


def test_cli_errors_are_one_line(tmp_path, tiny, capsys):
    bad = write_lines(tmp_path / "bad.jsonl", [row("q", "no final answer")])
    base = ["--config", str(CONFIG), f"model.path={tiny['model']}", f"output_dir={tmp_path / 'o'}",
            f"data.train={tiny['gsm8k_train']}"]
    with pytest.raises(SystemExit) as caught:
        gsm8k.main([*base, f"data.test={bad}"])
    err = capsys.readouterr().err.strip()
    assert caught.value.code == 2 and len(err.splitlines()) == 1
    assert "data.test" in err and f"{bad}:1" in err and "'answer'" in err
    with pytest.raises(SystemExit) as caught:
        gsm8k.main([*base, f"data.test={tmp_path / 'absent.jsonl'}"])
    err = capsys.readouterr().err.strip()
    assert caught.value.code == 1 and "data.test" in err and "absent.jsonl" in err
    with pytest.raises(SystemExit) as caught:
        gsm8k.main([*base[:-1], f"data.test={tiny['gsm8k_test']}"])   # no data.train
    assert caught.value.code == 2 and "data.train" in capsys.readouterr().err


@pytest.mark.skipif(not (GSM8K / "test.jsonl").is_file(),
                    reason=f"real GSM8K not found at {GSM8K}/test.jsonl (set GSM8K_DIR to its folder)")
def test_real_gsm8k_reader_and_targets():
    test = gsm8k.load_split(str(GSM8K / "test.jsonl"), "data.test", limit=5)
    assert [e.target for e in test] == ["18", "3", "70000", "540", "20"]
    assert test[0].question.startswith("Janet\u2019s ducks lay 16 eggs per day.")
    every = read_gsm8k(GSM8K / "test.jsonl")
    assert len(every) == 1319
    assert all(re.fullmatch(r"-?[0-9]+", e.target) for e in every)   # commas removed
    assert all(strict_answer(e.answer) == e.answer.rsplit("#### ", 1)[1].strip() for e in every)


# ---------------------------------------------------------------------- generation


def prompt_ids(tiny, tokenizer, n: int, shots: int = 1) -> list[list[int]]:
    test = read_gsm8k(tiny["gsm8k_test"])[:n]
    train = read_gsm8k(tiny["gsm8k_train"])
    prompts, _ = build_prompts(test, train, GSM8KPromptConfig(num_fewshot=shots))
    return encode_prompts(tokenizer, prompts, None)[0]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_left_padded_batch_equals_one_by_one(tiny, lively, attn):
    model, tokenizer = load_causal_lm(LMModelConfig(path=str(lively), attn_implementation=attn))
    ids = prompt_ids(tiny, tokenizer, 6)
    assert len({len(p) for p in ids}) > 2                      # real padding in the batch
    gen = GSM8KGenerationConfig(max_new_tokens=24, batch_size=6, stop=[])
    batched = generate_all(model, tokenizer, ids, gen, CPU, progress=False)
    single = [generate_batch(model, tokenizer, [p], gen, CPU)[0] for p in ids]
    assert [c.ids for c in batched] == [c.ids for c in single]
    assert [c.text for c in batched] == [c.text for c in single]
    assert len({c.text for c in batched}) == len(ids)          # not one repeated output
    assert tokenizer.padding_side == "left"


def test_stop_strings_truncate_and_stop_early(tiny, lively):
    model, tokenizer = load_causal_lm(LMModelConfig(path=str(lively)))
    ids = prompt_ids(tiny, tokenizer, 3)
    free = generate_all(model, tokenizer, ids, GSM8KGenerationConfig(max_new_tokens=30, stop=[]),
                        CPU, progress=False)
    stop = next(c.text[10:13] for c in free if len(c.text) > 20)   # a string row 0 generates
    stopped = generate_all(model, tokenizer, ids,
                           GSM8KGenerationConfig(max_new_tokens=30, stop=[stop]), CPU,
                           progress=False)
    for before, after in zip(free, stopped, strict=True):
        if stop in before.text:
            assert after.text == before.text[:before.text.index(stop)]
            assert after.finish == "stop" and after.tokens < 30
            assert after.ids == before.ids[:after.tokens]
        else:
            assert after.text == before.text
    assert truncate_at_stop("a Question: b </s> c", ["</s>", "Question:"]) == "a "
    assert truncate_at_stop("abc", ["x", ""]) == "abc"


# ---------------------------------------------------------------------- end to end


def run_main(tmp_path, tiny, model_path, *extra):
    out = tmp_path / "run"
    results = gsm8k.main(["--config", str(CONFIG), f"model.path={model_path}",
                          f"data.train={tiny['gsm8k_train']}", f"data.test={tiny['gsm8k_test']}",
                          f"output_dir={out}", "data.limit=10", "prompt.num_fewshot=1",
                          "generation.max_new_tokens=12", "generation.batch_size=4", *extra])
    return out, results


def test_end_to_end_writes_results_predictions_and_config(tmp_path, tiny, capsys):
    out, results = run_main(tmp_path, tiny, tiny["model"])
    assert "gsm8k: pass@1 strict" in capsys.readouterr().out
    saved = json.loads((out / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert saved["num_problems"] == 10 and saved["num_fewshot"] == 1
    assert saved["problems_per_second"] > 0 and saved["model"]["kind"] == "hf_directory"
    assert saved["fewshot_sampling"] == "per_question" and saved["fewshot_ids"] is None
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(10))        # test order, not length order
    test = read_gsm8k(tiny["gsm8k_test"])
    assert [r["target"] for r in rows] == [e.target for e in test[:10]]
    assert sum(r["strict_correct"] for r in rows) == saved["correct_strict"]
    assert sum(r["flexible_correct"] for r in rows) == saved["correct_flexible"]
    assert saved["pass_at_1_flexible"] == pytest.approx(10.0 * saved["correct_flexible"])
    assert sum(saved["finish"].values()) == 10
    for r in rows:
        assert r["strict_answer"] == strict_answer(r["completion"])
        assert r["flexible_answer"] == flexible_answer(r["completion"])
        assert len(r["fewshot_ids"]) == 1
    cfg = load_config(out / "config.yaml", [], schema=GSM8KEvalConfig)
    assert cfg.data.limit == 10 and cfg.model.path == str(tiny["model"])


def test_fixed_fewshot_and_truncated_prompts_are_recorded(tmp_path, tiny):
    # 5-shot prompts (~500 tokens) exceed 512 positions minus 64 new tokens (RoPE: the
    # config's max_position_embeddings is the only thing that limits the context)
    model, tokenizer = load_causal_lm(LMModelConfig(path=str(tiny["model"])))
    model.config.max_position_embeddings = 512
    short = tmp_path / "short_context"
    model.save_pretrained(short)
    tokenizer.save_pretrained(short)
    _, results = run_main(tmp_path, tiny, short, "prompt.num_fewshot=5",
                          "prompt.fewshot_sampling=fixed", "generation.max_new_tokens=64",
                          "data.limit=4")
    assert len(results["fewshot_ids"]) == 5 and results["prompts_truncated"] == 4


def test_lora_adapter_directory_is_evaluated(tmp_path, tiny, lively):
    base, _ = load_causal_lm(LMModelConfig(path=str(lively)))
    model = apply_lora(base, LoRAConfig(enabled=True, r=4, alpha=8))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.5)                      # B = 0 would change nothing
    adapter = tmp_path / "adapter"
    model.save_pretrained(adapter)
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    out, results = run_main(tmp_path, tiny, adapter, "data.limit=4")
    assert results["model"]["kind"] == "lora_adapter"
    assert results["model"]["base_model"] == str(lively.resolve())
    run_main(tmp_path / "b", tiny, lively, "data.limit=4")
    lora_rows = (out / "predictions.jsonl").read_text()
    assert lora_rows != (tmp_path / "b" / "run" / "predictions.jsonl").read_text()


def test_lm_trainer_checkpoint_is_evaluated(tmp_path, tiny, lively):
    from omegaconf import OmegaConf

    model, _ = load_causal_lm(LMModelConfig(path=str(lively)))
    lora = LoRAConfig(enabled=True, r=2, alpha=4)
    model = apply_lora(model, lora)
    config = OmegaConf.to_yaml({"model": {"path": str(lively), "lora": vars(lora)}})
    path = tmp_path / "checkpoint_00000010.pt"
    torch.save({"config": config, "model": trainable_state(model)}, path)
    _, results = run_main(tmp_path, tiny, path, "data.limit=2")
    assert results["model"]["kind"] == "lm_trainer_checkpoint" and results["num_problems"] == 2

