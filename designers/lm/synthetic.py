"""The tiny offline default of the language-model module: data, tokenizer and model that
take every code path a real model takes, with nothing downloaded.

- :func:`word_problems`: arithmetic word problems with step-by-step solutions, generated
  deterministically from a seed, written in the NuminaMath-CoT layout (``problem``,
  ``solution`` ending in ``\\boxed{n}``: the pretraining stream) and in the GSM8K layout
  (``question``, ``answer`` with ``<<a+b=c>>`` calculator annotations ending in
  ``#### n``: feedback and test);
- :func:`train_tokenizer`: a byte-level BPE trained in-process with ``tokenizers`` and
  saved as a ``transformers`` tokenizer (``PreTrainedTokenizerFast``);
- :func:`tiny_qwen2`: a Qwen2-architecture causal LM built from a ``Qwen2Config`` and
  saved with ``save_pretrained`` (safetensors), next to its tokenizer, so
  ``AutoModelForCausalLM.from_pretrained(dir)`` loads it like any released model.

``python -m designers.lm.synthetic --out DIR`` writes ``DIR/numina.jsonl``,
``DIR/gsm8k/{train,test}.jsonl`` and ``DIR/model/`` (weights, config, tokenizer).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import dinov  # noqa: F401  (torchvision shim first: transformers imports torchvision)
from dinov.checkpoint import atomic_write_text

NAMES = ("Ava", "Ben", "Carla", "Dev", "Elena", "Farid", "Grace", "Hugo", "Ines", "Jonas",
         "Kira", "Liam", "Mina", "Noah", "Olga", "Pavel")
ITEMS = ("apples", "marbles", "stickers", "books", "coins", "pencils", "cookies", "stamps")
SPECIAL_TOKENS = ("<|endoftext|>", "<|pad|>")


@dataclass(frozen=True)
class WordProblem:
    """One problem: its text, the solution's steps (text, expression, value), the answer."""

    question: str
    steps: tuple[tuple[str, str, int], ...]
    answer: int

    def gsm8k(self) -> dict[str, str]:
        """The GSM8K layout: steps with ``<<expression=value>>`` annotations, ``#### n``."""
        lines = [f"{text} {expr}=<<{expr}={value}>>{value}." for text, expr, value in self.steps]
        return {"question": self.question, "answer": "\n".join([*lines, f"#### {self.answer}"])}

    def numina(self) -> dict[str, str]:
        """The NuminaMath-CoT layout: a worked solution ending in ``\\boxed{n}``."""
        lines = [f"{text} ${expr} = {value}$." for text, expr, value in self.steps]
        return {"problem": self.question,
                "solution": " ".join([*lines, f"The answer is $\\boxed{{{self.answer}}}$."])}


def _buy_and_give(rng: random.Random) -> WordProblem:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(5, 60), rng.randint(2, 40)
    c = rng.randint(1, a + b - 1)
    return WordProblem(
        f"{name} has {a} {item}. {name} buys {b} more {item} and then gives {c} {item} to a "
        f"friend. How many {item} does {name} have now?",
        ((f"After buying, {name} has", f"{a}+{b}", a + b),
         (f"After giving some away, {name} has", f"{a + b}-{c}", a + b - c)),
        a + b - c)


def _boxes(rng: random.Random) -> WordProblem:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    boxes, per_box, extra = rng.randint(2, 12), rng.randint(3, 25), rng.randint(1, 30)
    total = boxes * per_box
    return WordProblem(
        f"{name} packs {boxes} boxes with {per_box} {item} in each box and has {extra} {item} "
        f"left over. How many {item} did {name} have in all?",
        (("The boxes hold", f"{boxes}*{per_box}", total),
         ("With the leftovers that is", f"{total}+{extra}", total + extra)),
        total + extra)


def _share(rng: random.Random) -> WordProblem:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    friends, each = rng.randint(2, 9), rng.randint(2, 20)
    kept = rng.randint(1, 15)
    total = friends * each + kept
    return WordProblem(
        f"{name} has {total} {item}, keeps {kept} and shares the rest equally among "
        f"{friends} friends. How many {item} does each friend get?",
        ((f"{name} shares", f"{total}-{kept}", total - kept),
         ("Each friend gets", f"{total - kept}/{friends}", each)),
        each)


def _weekly(rng: random.Random) -> WordProblem:
    name = rng.choice(NAMES)
    per_day, days, price = rng.randint(2, 15), rng.randint(2, 7), rng.randint(2, 9)
    made = per_day * days
    return WordProblem(
        f"{name} bakes {per_day} cakes a day for {days} days and sells each cake for "
        f"${price}. How many dollars does {name} make?",
        ((f"{name} bakes", f"{per_day}*{days}", made),
         ("The sales bring in", f"{made}*{price}", made * price)),
        made * price)


TEMPLATES: tuple[Callable[[random.Random], WordProblem], ...] = (
    _buy_and_give, _boxes, _share, _weekly)


def word_problems(n: int, seed: int) -> Iterator[WordProblem]:
    """``n`` problems, deterministic given ``seed`` (templates drawn uniformly)."""
    rng = random.Random(seed)
    for _ in range(n):
        yield rng.choice(TEMPLATES)(rng)


def write_jsonl(rows: list[dict[str, str]], path: pathlib.Path) -> None:
    atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in rows))


def train_tokenizer(texts: list[str], vocab_size: int = 512):  # noqa: ANN201 (a PreTrainedTokenizerFast)
    """A byte-level BPE trained on ``texts``, as a ``transformers`` fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=SPECIAL_TOKENS[0],
                                   pad_token=SPECIAL_TOKENS[1])


def tiny_qwen2(vocab_size: int, seed: int = 0, hidden_size: int = 64, layers: int = 2,
               heads: int = 4, kv_heads: int = 2, max_positions: int = 2048):  # noqa: ANN201
    """A randomly initialised Qwen2ForCausalLM of the given size (fp32, eager attention)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=vocab_size, hidden_size=hidden_size,
                         intermediate_size=2 * hidden_size, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=max_positions, tie_word_embeddings=True,
                         attn_implementation="eager")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Qwen2ForCausalLM(config)


def write_default(out: pathlib.Path, n_corpus: int = 2000, n_train: int = 300,
                  n_test: int = 100, seed: int = 0) -> dict[str, pathlib.Path]:
    """The whole tiny default under ``out``; returns the paths a config points at."""
    corpus = [p.numina() for p in word_problems(n_corpus, seed)]
    train = [p.gsm8k() for p in word_problems(n_train, seed + 1)]
    test = [p.gsm8k() for p in word_problems(n_test, seed + 2)]
    paths = {"corpus": out / "numina.jsonl", "gsm8k_train": out / "gsm8k" / "train.jsonl",
             "gsm8k_test": out / "gsm8k" / "test.jsonl", "model": out / "model"}
    write_jsonl(corpus, paths["corpus"])
    write_jsonl(train, paths["gsm8k_train"])
    write_jsonl(test, paths["gsm8k_test"])
    texts = [f"{r['problem']} {r['solution']}" for r in corpus]
    texts += [f"{r['question']} {r['answer']}" for r in train]
    tokenizer = train_tokenizer(texts)
    model = tiny_qwen2(len(tokenizer), seed=seed)
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(paths["model"])
    tokenizer.save_pretrained(paths["model"])
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, required=True)
    parser.add_argument("--n-corpus", type=int, default=2000)
    parser.add_argument("--n-train", type=int, default=300)
    parser.add_argument("--n-test", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    paths = write_default(args.out, args.n_corpus, args.n_train, args.n_test, args.seed)
    print(json.dumps({k: str(v) for k, v in paths.items()}))


if __name__ == "__main__":
    main()
