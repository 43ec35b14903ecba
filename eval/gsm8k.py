"""GSM8K Pass@1 of a causal LM, as lm-evaluation-harness's ``gsm8k`` task measures it.

``python -m eval.gsm8k --config configs/eval/gsm8k.yaml model.path=DIR [key=value ...]``

``model.path`` is read by :func:`eval.lm.load_causal_lm`: a Hugging Face directory, a LoRA
adapter directory (``adapter_config.json``; its base model is loaded and the adapter
applied) or a checkpoint file of our LM trainer (``.pt``).

Protocol (the defaults reproduce lm-eval 0.4.13's ``gsm8k.yaml``, task version 3.0):

- **Prompt**: ``num_fewshot`` (5) solved examples of the train split, each
  ``Question: {question}\\nAnswer:`` + ``" "`` (lm-eval's default ``target_delimiter``) +
  the full ``{answer}`` (steps and ``#### n``) + ``"\\n\\n"`` (its default
  ``fewshot_delimiter``), then ``Question: {question}\\nAnswer:`` of the test question
  with nothing after the colon. No system prompt, no chat template; the tokenizer's own
  special tokens are added (a BOS for Llama-style tokenizers, nothing for Qwen), as
  lm-eval does by default.
- **Few-shot draws** (``prompt.fewshot_sampling``): ``per_question`` (default) is
  lm-eval's ``ContextSampler``: one ``random.Random(prompt.seed)`` (lm-eval's
  ``fewshot_random_seed`` default 1234) and ``rng.sample(train, num_fewshot)`` called once
  per test question in test order, so every question gets its own examples and the
  prompts equal lm-eval's, provided the train file is in the published order (as HF
  ``openai/gsm8k`` is; ``data.limit`` keeps the first N questions and their draws, as
  lm-eval's ``--limit`` does). ``fixed`` draws one set with the same seed and shares it
  by all questions (one prompt prefix; results.json lists its ids). Each question's ids
  are in predictions.jsonl either way.
- **Generation**: greedy (``do_sample=False``) with the KV cache, batches of
  ``generation.batch_size`` prompts LEFT-padded with an attention mask, sorted longest
  first (as lm-eval sorts), results written in test order. A row stops at EOS or once a
  stop string (``Question:``, ``</s>``, ``<|im_end|>``) appears in its generated text; the
  batch stops when every row has stopped or after ``max_new_tokens`` (256: lm-eval's
  ``max_gen_toks`` default for HF models). The completion is the generated tokens up to
  EOS / the stop, decoded with special tokens skipped and cut before the first stop
  string (lm-eval's ``postprocess_generated_text``). A prompt longer than the model's
  ``max_position_embeddings`` minus ``max_new_tokens`` keeps its last tokens (lm-eval's
  left truncation); results.json counts them (``prompts_truncated``). Settings of the
  model's own ``generation_config`` that greedy search uses (a ``repetition_penalty``)
  still apply, as they do under lm-eval, which also calls ``model.generate``.
- **Answers** (lm-eval's two filters): ``strict-match`` takes the FIRST match of
  ``#### (\\-?[0-9\\.\\,]+)``; ``flexible-extract`` the LAST match of
  ``(-?[$0-9.,]{2,})|(-?[0-9]+)`` (its first non-empty group); both stripped, and
  ``[invalid]`` when nothing matches.
- **Metric**: exact match after removing, in order, ``,`` then ``\\$`` then
  ``(?s).*#### `` then ``\\.$`` (``re.sub``) from prediction and reference (the full
  answer text, so the reference becomes its ``#### n`` number), and lower-casing.
  Pass@1 = mean exact match x 100, for each filter.

Where this differs from lm-eval: (1) stop strings are searched in the generated text
decoded with special tokens kept, so ``<|im_end|>`` stops a row even for tokenizers where
it is a special token (lm-eval's criterion also stops on it, but its final decode skips
special tokens before cutting, so text generated after it while other rows ran on is kept
there); (2) ties in the length sort are broken by test index, not by prompt text, so
batches can be composed differently (this only matters through padded-batch numerics,
which can flip a greedy token in a near-tie); (3) ``str.lower`` instead of numpy's
``np.char.lower`` (the same on digits and ``[invalid]``); (4) ``fewshot_sampling=fixed``
is ours. Nothing else is known to differ. Checked against lm-eval 0.4.13's own task code
on the same JSONL files: the prompts of all 1,319 test questions are equal, and its
filters and exact_match give the same answers and scores on synthetic completions.

Outputs in ``output_dir``: ``config.yaml`` (resolved), ``results.json`` (Pass@1 strict
and flexible in percent, counts, few-shot ids and seed, generation settings, throughput
in problems/second, the model source) and ``predictions.jsonl`` (per test question, in
test order: index, question, target, completion, both extracted answers and both
correctness flags, few-shot ids, prompt tokens, why generation stopped). A tqdm progress
bar is shown on a terminal only.
"""

from __future__ import annotations

import contextlib
import json
import logging
import pathlib
import random
import re
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import dinov  # noqa: F401  (torchvision shim first: transformers imports torchvision)
from dinov.checkpoint import atomic_write_text
from dinov.config import ConfigError, check_choice, check_range
from eval.lm import ADAPTER_CONFIG, LMModelConfig, adapter_base, load_causal_lm
from eval.pipeline import cli_main, prepare_output_dir, seed_all, write_run

log = logging.getLogger(__name__)

# lm-eval gsm8k.yaml (task version 3.0), verbatim
STRICT_PATTERN = r"#### (\-?[0-9\.\,]+)"
FLEXIBLE_PATTERN = r"(-?[$0-9.,]{2,})|(-?[0-9]+)"
REGEXES_TO_IGNORE = (",", r"\$", r"(?s).*#### ", r"\.$")
STOP_STRINGS = ("Question:", "</s>", "<|im_end|>")
FALLBACK = "[invalid]"  # lm-eval RegexFilter's answer when nothing matches
LM_EVAL_FEWSHOT_SEED = 1234  # lm-eval's default fewshot_random_seed

_STRICT = re.compile(STRICT_PATTERN)
_FLEXIBLE = re.compile(FLEXIBLE_PATTERN)
_IGNORE = tuple(re.compile(pattern) for pattern in REGEXES_TO_IGNORE)
# what a GSM8K answer must end with: "#### " and a number (commas allowed: "#### 1,080")
_FINAL_ANSWER = re.compile(r"#### (-?[0-9.,]*[0-9][0-9.,]*)\s*\Z")

SAMPLINGS = ("per_question", "fixed")
PRECISIONS = ("fp32", "bf16")
_DEVICE = re.compile(r"auto|cpu|cuda(:[0-9]+)?|mps")


# ------------------------------------------------------------------------------ config


@dataclass
class GSM8KDataConfig:
    """GSM8K JSON Lines files (``question``, ``answer`` ending ``#### n``): ``train`` (the
    few-shot pool; not needed for 0-shot), ``test``, and ``limit`` (the first N test
    questions; null = all)."""

    train: str | None = None
    test: str | None = None
    limit: int | None = None

    def __post_init__(self) -> None:
        if self.limit is not None:
            check_range("data.limit", self.limit, 1)


@dataclass
class GSM8KPromptConfig:
    """The few-shot prompt (module docstring): ``num_fewshot`` examples drawn with ``seed``
    ``per_question`` (lm-eval) or one ``fixed`` set; a shot is ``question_template`` +
    ``target_delimiter`` + ``answer_template`` + ``fewshot_delimiter``, then the test
    question's ``question_template``."""

    num_fewshot: int = 5
    fewshot_sampling: str = "per_question"
    seed: int = LM_EVAL_FEWSHOT_SEED
    question_template: str = "Question: {question}\nAnswer:"
    answer_template: str = "{answer}"
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"

    def __post_init__(self) -> None:
        check_range("prompt.num_fewshot", self.num_fewshot, 0)
        check_choice("prompt.fewshot_sampling", self.fewshot_sampling, SAMPLINGS)
        _check_template("prompt.question_template", self.question_template, "question")
        _check_template("prompt.answer_template", self.answer_template, "answer")


@dataclass
class GSM8KGenerationConfig:
    """Greedy decoding: at most ``max_new_tokens`` per question, ``batch_size`` questions
    at a time, stopping at EOS or the first of the ``stop`` strings."""

    max_new_tokens: int = 256
    batch_size: int = 16
    stop: list[str] = field(default_factory=lambda: list(STOP_STRINGS))

    def __post_init__(self) -> None:
        check_range("generation.max_new_tokens", self.max_new_tokens, 1)
        check_range("generation.batch_size", self.batch_size, 1)
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ConfigError(f"config key 'generation.stop' must be a list of non-empty "
                              f"strings, got {self.stop!r}")


@dataclass
class GSM8KEvalConfig:
    """A GSM8K evaluation run. ``precision``: ``bf16`` runs the model under bfloat16
    autocast (``model.dtype`` sets the weights' dtype); ``device``: auto | cpu | cuda[:N]."""

    output_dir: str = "runs/eval_gsm8k"
    model: LMModelConfig = field(default_factory=LMModelConfig)
    data: GSM8KDataConfig = field(default_factory=GSM8KDataConfig)
    prompt: GSM8KPromptConfig = field(default_factory=GSM8KPromptConfig)
    generation: GSM8KGenerationConfig = field(default_factory=GSM8KGenerationConfig)
    precision: str = "fp32"
    device: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        check_choice("precision", self.precision, PRECISIONS)
        if not _DEVICE.fullmatch(self.device):
            raise ConfigError(f"config key 'device' must be auto, cpu, cuda or cuda:N, "
                              f"got {self.device!r}")


def _check_template(key: str, template: str, name: str) -> None:
    try:
        template.format(**{name: ""})
    except (KeyError, IndexError, ValueError) as error:
        raise ConfigError(f"config key '{key}' must be a format string whose only field is "
                          f"{{{name}}}, got {template!r} ({type(error).__name__}: {error})"
                          ) from None
    if f"{{{name}}}" not in template:
        raise ConfigError(f"config key '{key}' must contain {{{name}}}, got {template!r}")


def validate(cfg: GSM8KEvalConfig) -> None:
    """Raise ConfigError naming the first key whose value cannot work (before any work)."""
    if cfg.data.test is None:
        raise ConfigError("config key 'data.test' is required: a GSM8K test.jsonl")
    if cfg.prompt.num_fewshot > 0 and cfg.data.train is None:
        raise ConfigError(f"config key 'data.train' is required for prompt.num_fewshot="
                          f"{cfg.prompt.num_fewshot}: a GSM8K train.jsonl (the few-shot pool)")
    if cfg.model.path is None:
        raise ConfigError("config key 'model.path' is required: a Hugging Face model "
                          "directory, a LoRA adapter directory or a checkpoint .pt of the LM trainer")
    if cfg.model.lora.enabled:
        raise ConfigError("config key 'model.lora.enabled': the evaluation reads LoRA adapters "
                          "from model.path (an adapter directory or a trainer checkpoint); "
                          "leave it false")
    if cfg.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"config key 'device' is {cfg.device!r} but CUDA is not available")


# -------------------------------------------------------------------------------- data


class GSM8KFormatError(ValueError):
    """A GSM8K file line that cannot be read; the message names the file, line and field."""


@dataclass(frozen=True)
class GSM8KExample:
    """One GSM8K item: its 0-based position in the file, the texts, and the reference as
    the metric compares it (``normalise(answer)``: the ``#### n`` number)."""

    index: int
    question: str
    answer: str

    @property
    def target(self) -> str:
        return normalise(self.answer)


def read_gsm8k(path: str | pathlib.Path) -> list[GSM8KExample]:
    """The examples of a GSM8K JSON Lines file (blank lines skipped). FileNotFoundError if
    it is missing; GSM8KFormatError naming ``file:line`` and the field for a line that is
    not a JSON object, lacks a text ``question`` or ``answer``, or whose answer does not end
    with ``#### <number>``."""
    path = pathlib.Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: GSM8K file not found")
    examples = []
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if line.strip():
                examples.append(_parse_line(line, path, line_no, len(examples)))
    if not examples:
        raise GSM8KFormatError(f"{path}: no examples (expected one JSON object per line with "
                               f"'question' and 'answer')")
    return examples


def _parse_line(line: str, path: pathlib.Path, line_no: int, index: int) -> GSM8KExample:
    where = f"{path}:{line_no}"
    try:
        row = json.loads(line)
    except json.JSONDecodeError as error:
        raise GSM8KFormatError(f"{where}: not valid JSON ({error.msg} at column "
                               f"{error.colno})") from None
    if not isinstance(row, dict):
        raise GSM8KFormatError(f"{where}: expected a JSON object with 'question' and "
                               f"'answer', got {type(row).__name__}")
    for name in ("question", "answer"):
        if name not in row:
            raise GSM8KFormatError(f"{where}: field '{name}' is missing")
        if not isinstance(row[name], str):
            raise GSM8KFormatError(f"{where}: field '{name}' must be text, got "
                                   f"{type(row[name]).__name__}")
    if not _FINAL_ANSWER.search(row["answer"]):
        tail = row["answer"][-40:].replace("\n", "\\n")
        raise GSM8KFormatError(f"{where}: field 'answer' must end with '#### <number>', "
                               f"got ...{tail!r}")
    return GSM8KExample(index, row["question"], row["answer"])


def load_split(path: str, key: str, limit: int | None = None) -> list[GSM8KExample]:
    """:func:`read_gsm8k` for the config key ``key``: a missing file is a FileNotFoundError
    and a malformed one a ConfigError, each naming the key."""
    try:
        examples = read_gsm8k(path)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{key}: {error}") from None
    except GSM8KFormatError as error:
        raise ConfigError(f"config key '{key}' is not a GSM8K file: {error}") from None
    return examples[:limit] if limit is not None else examples


# --------------------------------------------------------------------------- prompting


def fewshot_ids(num_train: int, num_test: int, num_fewshot: int, sampling: str,
                seed: int) -> list[list[int]]:
    """Train indices of each test question's examples (module docstring): ``per_question``
    draws as lm-eval's ContextSampler, ``fixed`` one draw shared by all."""
    if num_fewshot > num_train:
        raise ConfigError(f"config key 'prompt.num_fewshot' ({num_fewshot}) exceeds the "
                          f"{num_train} examples of data.train")
    if num_fewshot == 0:
        return [[] for _ in range(num_test)]
    rng = random.Random(seed)
    pool = range(num_train)
    if sampling == "fixed":
        shared = rng.sample(pool, num_fewshot)
        return [list(shared) for _ in range(num_test)]
    return [rng.sample(pool, num_fewshot) for _ in range(num_test)]


def format_prompt(question: str, shots: Sequence[GSM8KExample], cfg: GSM8KPromptConfig) -> str:
    """The solved ``shots`` then ``question``, as lm-eval renders a plain-text prompt."""
    parts = [cfg.question_template.format(question=shot.question) + cfg.target_delimiter
             + cfg.answer_template.format(answer=shot.answer) + cfg.fewshot_delimiter
             for shot in shots]
    return "".join(parts) + cfg.question_template.format(question=question)


def build_prompts(test: Sequence[GSM8KExample], train: Sequence[GSM8KExample],
                  cfg: GSM8KPromptConfig) -> tuple[list[str], list[list[int]]]:
    """(prompt per test question, its few-shot train indices)."""
    ids = fewshot_ids(len(train), len(test), cfg.num_fewshot, cfg.fewshot_sampling, cfg.seed)
    prompts = [format_prompt(ex.question, [train[i] for i in shot_ids], cfg)
               for ex, shot_ids in zip(test, ids, strict=True)]
    return prompts, ids


# ----------------------------------------------------------------------------- answers


def strict_answer(text: str) -> str:
    """lm-eval's ``strict-match``: the first ``#### number``, stripped; ``[invalid]`` if none."""
    matches = _STRICT.findall(text)
    return matches[0].strip() if matches else FALLBACK


def flexible_answer(text: str) -> str:
    """lm-eval's ``flexible-extract``: the last number-like run (its first non-empty group),
    stripped; ``[invalid]`` if none."""
    matches = _FLEXIBLE.findall(text)
    if not matches:
        return FALLBACK
    groups = [group for group in matches[-1] if group]
    return groups[0].strip() if groups else FALLBACK


def normalise(text: str) -> str:
    """What exact match compares: ``regexes_to_ignore`` removed in order, lower case."""
    for pattern in _IGNORE:
        text = pattern.sub("", text)
    return text.lower()


def is_correct(prediction: str, reference: str) -> bool:
    """lm-eval's exact_match for one item (``reference``: the answer text or its number)."""
    return normalise(prediction) == normalise(reference)


def pass_at_1(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Pass@1 in percent: greedy answers that exactly match their references."""
    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"pass_at_1 needs as many predictions as references, at least one; "
                         f"got {len(predictions)} and {len(references)}")
    hits = sum(is_correct(p, r) for p, r in zip(predictions, references, strict=True))
    return 100.0 * hits / len(predictions)


# -------------------------------------------------------------------------- generation


def truncate_at_stop(text: str, stops: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any stop string (lm-eval's split on each)."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=len(text))
    return text[:cut]


def _stop_criterion(tokenizer: Any, stops: Sequence[str], prompt_len: int, rows: int) -> Any:
    """A StoppingCriteria marking each row done once a stop string is in its generated
    text; ``.hit_at[i]`` is how many tokens row ``i`` had generated then (None: never)."""
    import torch
    from transformers import StoppingCriteria

    # a stop string of b bytes lies within the last b tokens (each token is >= 1 byte)
    window = max((len(s.encode("utf-8")) for s in stops), default=0) + 2

    class StopOnStrings(StoppingCriteria):
        def __init__(self) -> None:
            self.hit_at: list[int | None] = [None] * rows

        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            generated = input_ids[:, prompt_len:]
            open_rows = [i for i, hit in enumerate(self.hit_at) if hit is None]
            if stops and open_rows:
                tails = tokenizer.batch_decode(generated[open_rows, -window:],
                                               skip_special_tokens=False)
                for i, tail in zip(open_rows, tails, strict=True):
                    if any(s in tail for s in stops):
                        self.hit_at[i] = generated.shape[1]
            return torch.tensor([hit is not None for hit in self.hit_at],
                                dtype=torch.bool, device=input_ids.device)

    return StopOnStrings()


def eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every id that ends a generation: the generation config's, the model config's and the
    tokenizer's EOS."""
    found: list[int] = []
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        for token in value if isinstance(value, list | tuple) else [value]:
            if token is not None and int(token) not in found:
                found.append(int(token))
    return found


@dataclass
class Completion:
    """One generated answer: the text, its token ids (up to EOS or the step its stop string
    appeared), and why generation ended (``stop``: a stop string, ``eos``, ``length``:
    max_new_tokens)."""

    text: str
    ids: list[int]
    finish: str

    @property
    def tokens(self) -> int:
        return len(self.ids)


def generate_batch(model: Any, tokenizer: Any, batch: list[list[int]],
                   gen: GSM8KGenerationConfig, device: Any) -> list[Completion]:
    """Greedy completions of the token-id prompts ``batch``, left-padded into one batch."""
    import torch
    from transformers import GenerationConfig, StoppingCriteriaList

    tokenizer.padding_side = "left"
    padded = tokenizer.pad({"input_ids": batch}, padding=True, return_tensors="pt")
    input_ids = padded["input_ids"].to(device)
    prompt_len = input_ids.shape[1]
    eos = eos_token_ids(model, tokenizer)
    criterion = _stop_criterion(tokenizer, gen.stop, prompt_len, len(batch))
    config = GenerationConfig(max_new_tokens=gen.max_new_tokens, do_sample=False, num_beams=1,
                              use_cache=True, eos_token_id=eos or None,
                              pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=padded["attention_mask"].to(device),
                             generation_config=config,
                             stopping_criteria=StoppingCriteriaList([criterion]))
    completions = []
    for row, ids in enumerate(out[:, prompt_len:].tolist()):
        eos_at = next((i for i, token in enumerate(ids) if token in eos), None)
        stop_at = criterion.hit_at[row]
        if stop_at is not None and (eos_at is None or stop_at <= eos_at):
            ids, finish = ids[:stop_at], "stop"
        elif eos_at is not None:
            ids, finish = ids[:eos_at], "eos"
        else:
            finish = "length"
        text = tokenizer.decode(ids, skip_special_tokens=True)
        completions.append(Completion(truncate_at_stop(text, gen.stop), ids, finish))
    return completions


def encode_prompts(tokenizer: Any, prompts: Sequence[str], max_tokens: int | None
                   ) -> tuple[list[list[int]], int]:
    """Token ids per prompt (the tokenizer's special tokens added, as lm-eval does), each
    keeping its last ``max_tokens`` (lm-eval's left truncation); and how many were cut."""
    encoded = tokenizer(list(prompts))["input_ids"]
    if max_tokens is None:
        return encoded, 0
    truncated = sum(len(ids) > max_tokens for ids in encoded)
    return [ids[-max_tokens:] for ids in encoded], truncated


def generate_all(model: Any, tokenizer: Any, prompt_ids: Sequence[list[int]],
                 gen: GSM8KGenerationConfig, device: Any, precision: str = "fp32",
                 progress: bool | None = None) -> list[Completion]:
    """Completions of every prompt in input order; batches run longest prompt first."""
    import torch
    from tqdm import tqdm

    order = sorted(range(len(prompt_ids)), key=lambda i: (-len(prompt_ids[i]), i))
    results: list[Completion | None] = [None] * len(prompt_ids)
    show = sys.stderr.isatty() if progress is None else progress
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    with tqdm(total=len(order), desc="gsm8k", unit="problem", disable=not show) as bar, autocast:
        for start in range(0, len(order), gen.batch_size):
            rows = order[start:start + gen.batch_size]
            batch = generate_batch(model, tokenizer, [prompt_ids[i] for i in rows], gen, device)
            for i, completion in zip(rows, batch, strict=True):
                results[i] = completion
            bar.update(len(rows))
    return [c for c in results if c is not None]


# --------------------------------------------------------------------------------- run


@contextlib.contextmanager
def _hf_progress_bars(enabled: bool) -> Iterator[None]:
    """transformers' own progress bars (loading weights) only where ours would show."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if not enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def resolve_device(name: str) -> Any:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def model_summary(cfg: LMModelConfig, model: Any) -> dict[str, Any]:
    """Where the evaluated weights came from, for results.json."""
    path = pathlib.Path(str(cfg.path)).expanduser()
    if path.suffix == ".pt":
        kind, base = "lm_trainer_checkpoint", None
    elif (path / ADAPTER_CONFIG).is_file():
        kind, base = "lora_adapter", str(adapter_base(path).resolve())
    else:
        kind, base = "hf_directory", None
    return {"path": str(path.resolve()), "kind": kind, "base_model": base,
            "parameters": sum(p.numel() for p in model.parameters()),
            "dtype": cfg.dtype, "attn_implementation": cfg.attn_implementation,
            "architecture": type(getattr(model, "get_base_model", lambda: model)()).__name__}


def score(test: Sequence[GSM8KExample], completions: Sequence[Completion],
          ids: Sequence[list[int]], prompt_ids: Sequence[list[int]]) -> list[dict[str, Any]]:
    """The predictions.jsonl rows, in test order."""
    rows = []
    for ex, completion, shot_ids, prompt in zip(test, completions, ids, prompt_ids, strict=True):
        strict, flexible = strict_answer(completion.text), flexible_answer(completion.text)
        rows.append({"index": ex.index, "question": ex.question, "target": ex.target,
                     "completion": completion.text, "strict_answer": strict,
                     "flexible_answer": flexible, "strict_correct": is_correct(strict, ex.answer),
                     "flexible_correct": is_correct(flexible, ex.answer),
                     "fewshot_ids": shot_ids, "prompt_tokens": len(prompt),
                     "completion_tokens": completion.tokens, "finish": completion.finish})
    return rows


def summarise(cfg: GSM8KEvalConfig, rows: Sequence[dict[str, Any]], seconds: float,
              truncated: int) -> dict[str, Any]:
    """The results.json content (less the model), from the scored rows."""
    n = len(rows)
    strict = sum(r["strict_correct"] for r in rows)
    flexible = sum(r["flexible_correct"] for r in rows)
    tokens = sum(r["completion_tokens"] for r in rows)
    finish = {kind: sum(r["finish"] == kind for r in rows) for kind in ("stop", "eos", "length")}
    fixed = cfg.prompt.fewshot_sampling == "fixed"
    return {
        "pass_at_1_strict": 100.0 * strict / n, "pass_at_1_flexible": 100.0 * flexible / n,
        "correct_strict": strict, "correct_flexible": flexible, "num_problems": n,
        "num_fewshot": cfg.prompt.num_fewshot, "fewshot_sampling": cfg.prompt.fewshot_sampling,
        "fewshot_seed": cfg.prompt.seed,
        "fewshot_ids": rows[0]["fewshot_ids"] if fixed else None,
        "prompts_truncated": truncated, "finish": finish,
        "max_new_tokens": cfg.generation.max_new_tokens, "batch_size": cfg.generation.batch_size,
        "generated_tokens": tokens, "seconds": seconds,
        "problems_per_second": n / seconds if seconds > 0 else None,
        "tokens_per_second": tokens / seconds if seconds > 0 else None,
    }


def run(cfg: GSM8KEvalConfig) -> dict[str, Any]:
    """Validate, read the data, load the model, generate, score, write the run."""
    validate(cfg)
    out = prepare_output_dir(cfg.output_dir)
    seed_all(cfg.seed)
    test = load_split(cfg.data.test, "data.test", cfg.data.limit)
    train = load_split(cfg.data.train, "data.train") if cfg.prompt.num_fewshot else []
    prompts, ids = build_prompts(test, train, cfg.prompt)
    device = resolve_device(cfg.device)
    with _hf_progress_bars(sys.stderr.isatty()):
        model, tokenizer = load_causal_lm(cfg.model)
    model.to(device)
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions is not None and cfg.generation.max_new_tokens >= positions:
        raise ConfigError(f"config key 'generation.max_new_tokens' "
                          f"({cfg.generation.max_new_tokens}) must be below the model's "
                          f"max_position_embeddings ({positions})")
    start = time.perf_counter()
    prompt_ids, truncated = encode_prompts(
        tokenizer, prompts, None if positions is None else positions - cfg.generation.max_new_tokens)
    if truncated:
        log.warning("%d of %d prompts are longer than max_position_embeddings - max_new_tokens "
                    "and keep their last tokens", truncated, len(prompts))
    completions = generate_all(model, tokenizer, prompt_ids, cfg.generation, device, cfg.precision)
    seconds = time.perf_counter() - start
    rows = score(test, completions, ids, prompt_ids)
    atomic_write_text(out / "predictions.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    results = summarise(cfg, rows, seconds, truncated)
    results["model"] = model_summary(cfg.model, model)
    results["device"], results["precision"] = str(device), cfg.precision
    write_run(out, cfg, results)
    return results


def report(results: dict[str, Any]) -> str:
    return (f"gsm8k: pass@1 strict {results['pass_at_1_strict']:.2f}%  flexible "
            f"{results['pass_at_1_flexible']:.2f}%  ({results['num_problems']} problems, "
            f"{results['num_fewshot']}-shot, {results['problems_per_second'] or 0:.2f} problems/s)")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return cli_main(argv, "GSM8K Pass@1 of a causal LM (lm-evaluation-harness's gsm8k task).",
                    GSM8KEvalConfig, run, report)


if __name__ == "__main__":
    main()
