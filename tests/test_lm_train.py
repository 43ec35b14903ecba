"""The language-model learner (designers/lm): packing, exact resume, DDP, LoRA, export, and
bad input named before any training. All on the tiny offline default (a 2-layer Qwen2)."""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import socket

import pytest
import torch
import torch.multiprocessing as mp

import dinov  # noqa: F401  (torchvision shim first)
from designers.lm.config import LMConfig, LMDataConfig
from designers.lm.data import IGNORE_INDEX, PackedStream, read_corpus, tokenize_document
from designers.lm.synthetic import write_default
from designers.lm.train import LMTrainer, main
from dinov.checkpoint import latest_checkpoint, load_checkpoint
from dinov.config import ConfigError, load_config
from eval.lm import LMModelConfig, load_causal_lm

SMOKE = "configs/lm/smoke.yaml"
QUIET = ["train.progress=none"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, pathlib.Path]:
    return write_default(tmp_path_factory.mktemp("lm_tiny"), n_corpus=400, n_train=40, n_test=20)


def cfg_of(tiny, out: pathlib.Path, *overrides: str) -> LMConfig:
    return load_config(SMOKE, [f"output_dir={out}", f"model.path={tiny['model']}",
                               f"data.path={tiny['corpus']}", *QUIET, "train.steps=6",
                               "train.log_every=1", "train.checkpoint_every=3", *overrides],
                       schema=LMConfig)


def rows(out: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------- packing
def test_packed_labels_ignore_prompt_and_padding(tiny):
    _, tokenizer = load_causal_lm(LMModelConfig(path=str(tiny["model"])))
    data = LMDataConfig(path=str(tiny["corpus"]), seq_len=160, shuffle_buffer=16)
    stream = PackedStream(read_corpus(tiny["corpus"]), tokenizer, data, str(tiny["corpus"]))
    batch = stream.next_batch(4)
    assert batch["input_ids"].shape == (4, 160)
    for row in range(4):
        ids, labels, pos = (batch[k][row].tolist() for k in ("input_ids", "labels", "position_ids"))
        starts = [i for i, p in enumerate(pos) if p == 0]
        segments = list(zip(starts, [*starts[1:], len(pos)], strict=True))
        for start, end in segments:
            segment_ids = ids[start:end]
            if all(t == tokenizer.pad_token_id for t in segment_ids) and start > 0:
                assert labels[start:end] == [IGNORE_INDEX] * (end - start)  # padding
                continue
            # a whole document: the prompt's labels are ignored, the answer's are its tokens
            text = tokenizer.decode(segment_ids)
            problem = text.split("\nAnswer: ")[0].removeprefix("Question: ")
            prompt_len = len(tokenizer(f"Question: {problem}\nAnswer: ",
                                       add_special_tokens=False)["input_ids"])
            assert labels[start:start + prompt_len] == [IGNORE_INDEX] * prompt_len
            assert labels[start + prompt_len:end] == segment_ids[prompt_len:]
            assert segment_ids[-1] == tokenizer.eos_token_id
        assert pos == [p for s, e in segments for p in range(e - s)]


def test_packed_documents_do_not_attend_to_each_other(tiny):
    """Each document's logits in a packed row equal the logits of that document alone."""
    model, tokenizer = load_causal_lm(LMModelConfig(path=str(tiny["model"])))
    data = LMDataConfig(path=str(tiny["corpus"]), seq_len=200, shuffle_buffer=8)
    stream = PackedStream(read_corpus(tiny["corpus"]), tokenizer, data, str(tiny["corpus"]))
    batch = stream.next_batch(1)
    pos = batch["position_ids"][0].tolist()
    starts = [i for i, p in enumerate(pos) if p == 0]
    assert len(starts) >= 3  # at least two documents and padding
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                       use_cache=False).logits[0]
        for start, end in zip(starts[:-1], starts[1:], strict=True):
            alone = model(input_ids=batch["input_ids"][:, start:end], use_cache=False).logits[0]
            torch.testing.assert_close(packed[start:end], alone, atol=1e-5, rtol=1e-5)
        # the check can fail: without restarting positions the second document sees the first
        mixed = model(input_ids=batch["input_ids"], use_cache=False).logits[0]
        start, end = starts[1], starts[2]
        assert (mixed[start:end] - packed[start:end]).abs().max() > 1e-3


def test_overlong_documents_are_split_or_dropped_and_counted(tiny):
    _, tokenizer = load_causal_lm(LMModelConfig(path=str(tiny["model"])))
    dataset = read_corpus(tiny["corpus"])
    lengths = [len(tokenize_document(tokenizer, r["problem"], r["solution"],
                                     LMDataConfig()).input_ids) for r in dataset.select(range(50))]
    seq_len = sorted(lengths)[len(lengths) // 2]  # about half the documents are longer
    for mode in ("split", "drop"):
        data = LMDataConfig(seq_len=seq_len, shuffle_buffer=4, overlong=mode)
        stream = PackedStream(dataset, tokenizer, data, str(tiny["corpus"]))
        batch = stream.next_batch(20)
        counted = stream.stats[f"overlong_{'split' if mode == 'split' else 'dropped'}"]
        assert counted > 0 and batch["input_ids"].shape == (20, seq_len)
        if mode == "drop":
            assert stream.stats["overlong_split"] == 0


# ------------------------------------------------------------------------- training
def test_smoke_run_learns_and_exports_a_loadable_model(tiny, tmp_path):
    out = tmp_path / "run"
    results = main(["--config", SMOKE, f"output_dir={out}", f"model.path={tiny['model']}",
                    f"data.path={tiny['corpus']}", *QUIET, "train.steps=30"])
    losses = [r["loss"] for r in rows(out)]
    assert results["steps"] == 30 and losses[-1] < losses[0] - 1.0, losses
    for name in ("config.yaml", "results.json", "metrics.jsonl", "final/config.json",
                 "final/model.safetensors", "final/tokenizer.json"):
        assert (out / name).is_file(), name
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(out / "final", local_files_only=True)
    trained = load_checkpoint(latest_checkpoint(out / "checkpoints"))["model"]
    for key, value in exported.state_dict().items():
        if key in trained:
            assert torch.equal(value, trained[key]), key


def test_resume_after_a_stop_is_bitwise_the_uninterrupted_run(tiny, tmp_path):
    straight = tmp_path / "straight"
    LMTrainer(cfg_of(tiny, straight)).fit()
    resumed = tmp_path / "resumed"
    assert LMTrainer(cfg_of(tiny, resumed, "train.stop_at_step=4")).fit() == {"stopped_at_step": 4}
    LMTrainer(cfg_of(tiny, resumed, "train.resume=true")).fit()
    assert rows(straight) == rows(resumed)
    a = load_checkpoint(latest_checkpoint(straight / "checkpoints"))
    b = load_checkpoint(latest_checkpoint(resumed / "checkpoints"))
    assert a["step"] == b["step"] == 6 and a["stream"] == b["stream"]
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


def test_lora_trains_only_the_adapters_and_the_merged_export_matches(tiny, tmp_path):
    out = tmp_path / "lora"
    cfg = cfg_of(tiny, out, "model.lora.enabled=true", "model.lora.dropout=0.0", "optim.lr=1e-2")
    trainer = LMTrainer(cfg)
    base = {k: v.clone() for k, v in trainer.model.state_dict().items() if "lora_" not in k}
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    trainer.fit()  # its export merges the adapters into trainer.model (the run is over)
    saved = load_checkpoint(latest_checkpoint(out / "checkpoints"))["model"]
    assert set(saved) == set(trainable)
    # merge_and_unload changed trainer.model's base in place at export: compare with a
    # freshly loaded adapter model instead
    adapter = LMTrainer(cfg_of(tiny, tmp_path / "again", "model.lora.enabled=true",
                               "model.lora.dropout=0.0"))
    adapter.model.load_state_dict(saved, strict=False)
    for key, value in base.items():  # the frozen base did not move
        assert torch.equal(adapter.model.state_dict()[key], value), key
    merged, _ = load_causal_lm(LMModelConfig(path=str(out / "final")))
    ids = torch.randint(0, 500, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = adapter.model.eval()(input_ids=ids).logits
        got = merged(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    with torch.no_grad(), adapter.model.disable_adapter():  # the adapters did change the model
        assert (expected - adapter.model(input_ids=ids).logits).abs().max() > 1e-3


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ddp_worker(rank: int, port: int, model: str, corpus: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2,
                                         timeout=datetime.timedelta(seconds=120))
    try:
        cfg = load_config(SMOKE, [f"output_dir={out}", f"model.path={model}", f"data.path={corpus}",
                                  *QUIET, "train.steps=4", "train.log_every=1",
                                  "train.micro_batch_size=2", "train.grad_accum=2",
                                  "dist.strategy=ddp"], schema=LMConfig)
        LMTrainer(cfg).fit()
    finally:
        torch.distributed.destroy_process_group()


def test_two_processes_equal_one_at_the_same_global_batch(tiny, tmp_path):
    """2 gloo ranks x micro 2 x accumulation 2 against one process x micro 4 x 2: the same
    8 sequences a step, normalised by the global token count."""
    two = tmp_path / "two"
    mp.spawn(_ddp_worker, args=(_free_port(), str(tiny["model"]), str(tiny["corpus"]), str(two)),
             nprocs=2, join=True)
    one = tmp_path / "one"
    LMTrainer(cfg_of(tiny, one, "train.steps=4", "train.micro_batch_size=4",
                     "train.grad_accum=2")).fit()
    for a, b in zip(rows(one), rows(two), strict=True):
        assert a["step"] == b["step"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
    wa = load_checkpoint(latest_checkpoint(one / "checkpoints"))["model"]
    wb = load_checkpoint(latest_checkpoint(two / "checkpoints"))["model"]
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-4, atol=1e-6, msg=key)


# ------------------------------------------------------------------------- bad input
def test_bad_corpus_lines_and_fields_are_named(tiny, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "a", "solution": "b"}\n{"problem": "c", \n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not JSON"):
        read_corpus(bad)
    bad.write_text('{"question": "a", "answer": "b"}\n')
    with pytest.raises(ValueError, match=r"expected 'problem' and 'solution' columns, or 'messages'"):
        read_corpus(bad)
    bad.write_text('{"problem": "a", "solution": "b"}\n{"problem": "c", "solution": null}\n')
    _, tokenizer = load_causal_lm(LMModelConfig(path=str(tiny["model"])))
    stream = PackedStream(read_corpus(bad), tokenizer, LMDataConfig(shuffle_buffer=1), str(bad))
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: the document has no 'solution'"):
        stream.next_batch(2)


def test_messages_corpus(tiny, tmp_path):
    corpus = tmp_path / "messages.jsonl"
    corpus.write_text(json.dumps({"messages": [{"role": "user", "content": "What is 2+3?"},
                                               {"role": "assistant", "content": "5"}]}) + "\n")
    _, tokenizer = load_causal_lm(LMModelConfig(path=str(tiny["model"])))
    stream = PackedStream(read_corpus(corpus), tokenizer, LMDataConfig(seq_len=64), str(corpus))
    ids = stream.next_batch(1)["input_ids"][0].tolist()
    assert tokenizer.decode(ids).startswith("Question: What is 2+3?\nAnswer: 5")


def test_bad_model_directories_and_settings_are_named(tiny, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny["model"], broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="has no weights"):
        load_causal_lm(LMModelConfig(path=str(broken)))
    (broken / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_causal_lm(LMModelConfig(path=str(broken)))
    # a tokenizer of another (larger) vocabulary
    from designers.lm.synthetic import tiny_qwen2, train_tokenizer

    other = tmp_path / "other"
    tiny_qwen2(vocab_size=200).save_pretrained(other)  # the byte alphabet alone is 256 tokens
    train_tokenizer(["Question: Answer: 1 2 3"] * 10).save_pretrained(other)
    with pytest.raises(ValueError, match="tokenizer has .* tokens but the model's embeddings have 200"):
        load_causal_lm(LMModelConfig(path=str(other)))
    with pytest.raises(ConfigError, match="model.lora.target_modules.*no modules \\['wq'\\]"):
        LMTrainer(cfg_of(tiny, tmp_path / "x", "model.lora.enabled=true",
                         "model.lora.target_modules=[wq]"))
    with pytest.raises(ConfigError, match="'data.seq_len' \\(4096\\) exceeds the model's "
                                          "max_position_embeddings \\(2048\\)"):
        LMTrainer(cfg_of(tiny, tmp_path / "y", "data.seq_len=4096"))
    with pytest.raises(ConfigError, match="'optim.lr'"):
        cfg_of(tiny, tmp_path / "z", "optim.lr=-1")


def test_cli_errors_are_one_line(tiny, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["--config", SMOKE, f"output_dir={tmp_path}", f"model.path={tmp_path / 'nope'}",
              f"data.path={tiny['corpus']}", *QUIET])
    assert info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope is not a directory" in err[0]


@pytest.mark.parametrize("name", ["qwen2.5-0.5b_lora", "qwen2.5-0.5b_full"])
def test_qwen_recipes_carry_the_published_settings(name):
    path = f"configs/lm/{name}.yaml"
    with pytest.raises(ConfigError, match="model.path"):  # marked ???: must be given
        load_config(path, [], schema=LMConfig)
    cfg = load_config(path, ["model.path=/m", "data.path=/d.parquet"], schema=LMConfig)
    assert cfg.train.precision == "bf16" and cfg.data.shuffle_buffer == 10000
    assert cfg.data.prompt_template.format(problem="p") == "Question: p\nAnswer: "
    if name.endswith("lora"):
        lora = cfg.model.lora
        assert lora.enabled and (lora.r, lora.alpha, lora.dropout) == (8, 16, 0.05)
        assert set(lora.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                            "up_proj", "down_proj"}
        assert (cfg.optim.lr, cfg.train.micro_batch_size, cfg.train.grad_accum) == (2e-4, 4, 8)
        assert cfg.train.steps == 2000 and cfg.data.seq_len == 1024
    else:
        assert not cfg.model.lora.enabled and cfg.optim.lr == 1.5e-5
        assert (cfg.train.micro_batch_size, cfg.train.grad_accum, cfg.data.seq_len) == (4, 32, 512)


def _gsm8k_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("GSM8K_DIR",
                                       pathlib.Path(__file__).resolve().parents[2] / "shared/data/gsm8k"))


def test_feedback_pool_is_a_seeded_sample_of_the_real_train_split(tiny):
    from designers.lm.data import feedback_documents, feedback_pool

    train = _gsm8k_dir() / "train.jsonl"
    if not train.is_file():
        pytest.skip(f"the real GSM8K is not at {train} (set GSM8K_DIR)")
    pool = feedback_pool(train, 1024, seed=0)
    assert len(pool) == 1024 and len({ex.index for ex in pool}) == 1024
    assert [ex.index for ex in pool] == sorted(ex.index for ex in pool)
    assert [ex.index for ex in feedback_pool(train, 1024, seed=0)] == [ex.index for ex in pool]
    assert [ex.index for ex in feedback_pool(train, 1024, seed=1)] != [ex.index for ex in pool]
    assert max(ex.index for ex in pool) < 7473
    _, tokenizer = load_causal_lm(LMModelConfig(path=str(tiny["model"])))
    docs = feedback_documents(pool[:3], tokenizer, LMDataConfig())
    for doc, ex in zip(docs, pool[:3], strict=True):
        answer = [t for t in doc.labels if t != IGNORE_INDEX]
        assert tokenizer.decode(answer[:-1]) == ex.answer and answer[-1] == tokenizer.eos_token_id
    with pytest.raises(ValueError, match="pool_size=8000 but .* holds 7473"):
        feedback_pool(train, 8000, seed=0)
