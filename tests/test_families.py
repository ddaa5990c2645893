"""Model families: tiny random pairs of ten transformers families (organism tokenizer plus each family's special
tokens and its own chat template, tests/data/templates/family_<name>.jinja; A = B + 5% noise; `save_pretrained`)
run harvest → train → eval → steer; hooks land exactly; the family's end-of-turn and generation_config eos stop a
reply; plain texts start with a BOS where the family's tokenizer adds one (docs/families.md)."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from tokenizers import processors

from dfc_ray.cli import main
from dfc_ray.config import CorpusSpec, DFCConfig, EvalConfig, GenerationConfig, HarvestConfig, SteerConfig, TrainConfig
from dfc_ray.generation import (STATIC_MODEL_TYPES, HookContext, decode_bytes_per_row, eos_token_ids, generate,
                                residual_hooks)
from dfc_ray.harvest import Record, build_corpus, default_bos, harvest, left_pad, residual_after_blocks
from dfc_ray.pair import PairSpec, load_model, load_pair, load_tokenizer
from dfc_ray.sweep.trial import trial_batches
from dfc_ray.tooluse import load_tasks, render_prompt
from dfc_ray.train import train

pytestmark = pytest.mark.usefixtures("one_thread")
TEMPLATES = Path(__file__).parent / "data" / "templates"
LAYER = 0
"""Block whose output is harvested and steered (of 2): hidden_states[LAYER + 1] is not the final-normed one."""


@dataclass(frozen=True)
class Family:
    """One transformers family as a tiny pair: its config, tokens and template."""

    name: str
    config: Callable[..., Any]
    """(vocab_size, bos_id, eos_ids, pad_id) → a transformers config."""
    template: str
    """tests/data/templates/family_<template>.jinja."""
    tokens: tuple[str, ...]
    """Special tokens the family's vocabulary adds to the organism's."""
    eos: str
    """The tokenizer's eos token."""
    end_of_turn: str
    """The token the template ends an assistant turn with: a reply must stop on it."""
    bos: str | None = None
    """The tokenizer's BOS token, when it has one."""
    adds_bos: bool = False
    """tokenizer(text) puts the BOS first (Llama, Mistral, Gemma)."""
    generation_eos: tuple[str, ...] = ()
    """generation_config.json's eos_token_id (besides the config's eos)."""
    wrapper: bool = False
    """A multimodal wrapper (Gemma3ForConditionalGeneration) around the causal LM."""
    model_kwargs: dict = field(default_factory=dict)
    dialect: str = "auto"
    """pair.dialect: auto where the template names its tool-call marker, else the family's (docs/tooluse.md)."""


def _small(**extra) -> dict:
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=1024, initializer_range=0.2, tie_word_embeddings=False) | extra


def _llama(**ids):
    from transformers import LlamaConfig
    return LlamaConfig(**_small(num_key_value_heads=2), **ids)


def _mistral(**ids):
    from transformers import MistralConfig
    return MistralConfig(**_small(num_key_value_heads=2, sliding_window=64), **ids)


def _gemma2(**ids):
    from transformers import Gemma2Config
    return Gemma2Config(**_small(num_attention_heads=2, num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16,
                                 sliding_window=64), **ids)


def _gemma3_text(**ids):
    from transformers import Gemma3TextConfig
    return Gemma3TextConfig(**_small(num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                     query_pre_attn_scalar=16, sliding_window=64), **ids)


def _gemma3(**ids):
    from transformers import Gemma3Config, SiglipVisionConfig
    vision = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                image_size=28, patch_size=14)
    return Gemma3Config(text_config=_gemma3_text(**ids).to_dict(), vision_config=vision.to_dict(),
                        mm_tokens_per_image=4, **{k: v for k, v in ids.items() if k != "pad_token_id"})


def _qwen2(**ids):
    from transformers import Qwen2Config
    return Qwen2Config(**_small(num_key_value_heads=2), **ids)


def _qwen3(**ids):
    from transformers import Qwen3Config
    return Qwen3Config(**_small(num_key_value_heads=2, head_dim=8), **ids)


def _olmo2(**ids):
    from transformers import Olmo2Config
    return Olmo2Config(**_small(num_key_value_heads=2), **ids)


def _phi3(**ids):
    from transformers import Phi3Config
    return Phi3Config(**_small(num_key_value_heads=2), **ids)


def _gpt_neox(**ids):
    from transformers import GPTNeoXConfig
    return GPTNeoXConfig(**_small(), **ids)


GEMMA_TOKENS = ("<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>")
FAMILIES = [
    Family("llama", _llama, "llama", ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                      "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>", "<|python_tag|>"),
           eos="<|end_of_text|>", end_of_turn="<|eot_id|>", bos="<|begin_of_text|>", adds_bos=True,
           generation_eos=("<|eom_id|>", "<|eot_id|>")),
    Family("mistral", _mistral, "mistral", ("<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]",
                                            "[/AVAILABLE_TOOLS]", "[TOOL_CALLS]"),
           eos="</s>", end_of_turn="</s>", bos="<s>", adds_bos=True, dialect="mistral"),
    Family("gemma2", _gemma2, "gemma2", GEMMA_TOKENS, eos="<eos>", end_of_turn="<end_of_turn>", bos="<bos>",
           adds_bos=True),  # <end_of_turn> from the vocabulary: its generation config names only <eos>
    Family("gemma3_text", _gemma3_text, "gemma3", GEMMA_TOKENS, eos="<eos>", end_of_turn="<end_of_turn>", bos="<bos>",
           adds_bos=True, generation_eos=("<end_of_turn>",)),
    Family("gemma3", _gemma3, "gemma3", GEMMA_TOKENS, eos="<eos>", end_of_turn="<end_of_turn>", bos="<bos>",
           adds_bos=True, generation_eos=("<end_of_turn>",), wrapper=True),
    Family("qwen2", _qwen2, "qwen2", (), eos="<|im_end|>", end_of_turn="<|im_end|>"),
    Family("qwen3", _qwen3, "qwen3", ("<think>", "</think>"), eos="<|im_end|>", end_of_turn="<|im_end|>"),
    Family("olmo2", _olmo2, "olmo2", (), eos="<|endoftext|>", end_of_turn="<|endoftext|>", bos="<|endoftext|>",
           dialect="json"),
    Family("phi3", _phi3, "phi3", ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|tool|>", "<|/tool|>",
                                   "<|tool_call|>", "<|/tool_call|>"), eos="<|endoftext|>", end_of_turn="<|end|>"),
    Family("gpt_neox", _gpt_neox, "gpt_neox", ("<|prompter|>", "<|assistant|>"), eos="<|endoftext|>",
           end_of_turn="<|endoftext|>", dialect="json"),
]
BY_NAME = {f.name: f for f in FAMILIES}


def base_tokenizer(root: Path):
    """The organism-style tokenizer every family starts from (its ChatML tokens and <tool_call> tags)."""
    from dfc_ray.organism import world
    from dfc_ray.organism.tokenizer import template_only, train_tokenizer

    renderer = template_only()
    texts = world.plain_text(200, 1) + [render_prompt(renderer, t) for t in world.load_split("dev")[:60]]
    tokenizer = train_tokenizer(texts, vocab_size=600)
    tokenizer.save_pretrained(root)
    return root


def build_family_pair(family: Family, tokenizer_dir: Path, root: Path) -> PairSpec:
    """The family's tokenizer (special tokens, eos/BOS, template, a BOS post-processor where it adds one) and a
    random pair B, A = B + 5% noise, saved under `root`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": list(family.tokens)})
    tokenizer.eos_token = family.eos
    if family.bos:
        tokenizer.bos_token = family.bos
    if family.adds_bos:
        bos = tokenizer.convert_tokens_to_ids(family.bos)
        tokenizer._tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{family.bos} $A", pair=f"{family.bos} $A {family.bos} $B", special_tokens=[(family.bos, bos)])
    tokenizer.chat_template = (TEMPLATES / f"family_{family.template}.jinja").read_text()
    tokenizer.save_pretrained(root / "tokenizer")
    ids = {"bos_token_id": tokenizer.bos_token_id, "pad_token_id": tokenizer.pad_token_id,
           "eos_token_id": [tokenizer.eos_token_id, *tokenizer.convert_tokens_to_ids(list(family.generation_eos))]}
    torch.manual_seed(0)
    config = family.config(vocab_size=len(tokenizer), **ids)
    model_b = AutoModelForCausalLM.from_config(config)
    model_a = copy.deepcopy(model_b)
    with torch.no_grad():
        for p in model_a.parameters():
            p.add_(0.05 * p.std().nan_to_num() * torch.randn_like(p))
    model_a.save_pretrained(root / "a")
    model_b.save_pretrained(root / "b")
    return PairSpec(a=str(root / "a"), b=str(root / "b"), tokenizer=str(root / "tokenizer"), device="cpu",
                    dialect=family.dialect)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Callable[[str], PairSpec]:
    """family name → its tiny pair, each built once per module."""
    root = tmp_path_factory.mktemp("families")
    tokenizer_dir = base_tokenizer(root / "organism-tokenizer")
    built: dict[str, PairSpec] = {}

    def get(name: str) -> PairSpec:
        if name not in built:
            built[name] = build_family_pair(BY_NAME[name], tokenizer_dir, root / name)
        return built[name]

    return get


@pytest.mark.parametrize("name", list(BY_NAME))
def test_harvest_train_eval_and_steer_run(name, pairs, tmp_path):
    from actors.evaluator import Evaluator
    from actors.steering import Steerer

    pair = pairs(name)
    corpus = CorpusSpec(tasks="organism:dev", n_tasks=8, plain_text="organism", n_plain=8, max_tokens=512)
    harvested = harvest(HarvestConfig(store=str(tmp_path / "store"), layers=(LAYER,), pair=pair, corpus=corpus,
                                      positions="all_tokens", batch_size=8, dtype="float32"),
                        use_ray=False, progress=False)
    assert harvested.d_model == 32 and harvested.rows > 64
    batches = trial_batches(harvested.uri, LAYER, 32, "local", 0, harvested.d_model, harvested.models)
    # k 16 of 64 with a quarter A-exclusive: some A-exclusive feature fires on dev prompts after four steps, so the
    # ranking has a signal and the steering protocol runs (a ranking that ties everywhere steers nothing)
    trained = train(DFCConfig(d_model=32, dict_size=64, k=16, a_exclusive=0.25, b_exclusive=0.125),
                    TrainConfig(steps=4, warmup_steps=1, norm_rows=64), batches, out_dir=tmp_path / "trained")
    assert trained.status == "ok"
    checkpoint = str(tmp_path / "trained" / "dfc")
    evaluated = Evaluator(pair, EvalConfig(tasks="organism:test", n_tasks=4, n_texts=2, max_new_tokens=4,
                                           batch_size=4, n_bootstrap=20)).evaluate(checkpoint, LAYER)
    assert evaluated.a_clean.correct.n == 4 and evaluated.loss_a is not None
    steered = Steerer(pair, SteerConfig(n_dev=6, n_test=4, n_plain=2, top_n=1, alphas=(0.8,), targets=("a",),
                                        primary="a", rankings=("cohens_d",), min_set_pool=1, min_set_max=1,
                                        max_new_tokens=4, batch_size=6, n_bootstrap=20)).steer(checkpoint, LAYER)
    assert not steered.skipped and steered.metrics()["steer_target"] == "a"
    # the ranking's plain-text negatives start with the BOS this family's tokenizer adds, as the harvest's do
    steerer = Steerer(pair, SteerConfig(n_dev=6, n_test=4, n_plain=3, batch_size=6))
    positives, inputs = steerer.ranking_inputs(steerer._tasks(steerer.cfg)[0], steerer.cfg)
    bos, plain = load_tokenizer(pair).bos_token_id, inputs[-3:]
    assert 0 < positives <= len(inputs) - 3 and [ids[0] == bos for ids in plain] == [BY_NAME[name].adds_bos] * 3
    assert all(ids[1] != bos for ids in inputs)  # never doubled


@pytest.mark.parametrize("name", list(BY_NAME))
def test_hooks_land_exactly_after_block_l(name, pairs):
    """The captured residual is hidden_states[L + 1]; an identity hook leaves the logits bit-identical; a delta
    added after block L changes nothing before it and appears exactly there."""
    spec = pairs(name)
    model, tokenizer = load_model(spec, "a"), load_tokenizer(spec)
    prompts = [render_prompt(tokenizer, task) for task in load_tasks("organism:dev")[:2]]
    records = [Record(ids[:n]) for ids, n in zip(tokenizer(prompts, add_special_tokens=False)["input_ids"], (40, 25))]
    ids, mask = left_pad(records, tokenizer.pad_token_id)
    forward = dict(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0),
                   output_hidden_states=True)
    real, ctx = mask.bool(), HookContext.for_forward(mask)
    with torch.inference_mode():
        clean = model(**forward)
        captured = residual_after_blocks(model, ids, mask, [LAYER])[LAYER]
        with residual_hooks(model, {LAYER: lambda hidden, _: hidden.clone()}, ctx):
            same = model(**forward)
        delta = torch.linspace(-1, 1, 32)
        with residual_hooks(model, {LAYER: lambda hidden, _: hidden + delta}, ctx):
            moved = model(**forward)
    assert torch.equal(captured[real], clean.hidden_states[LAYER + 1][real])
    assert torch.equal(same.logits, clean.logits)
    for before in range(LAYER + 1):
        assert torch.equal(moved.hidden_states[before], clean.hidden_states[before])
    assert torch.equal(moved.hidden_states[LAYER + 1], clean.hidden_states[LAYER + 1] + delta)
    assert not torch.allclose(moved.logits[real], clean.logits[real])


@pytest.mark.parametrize("name", list(BY_NAME))
def test_the_end_of_turn_and_generation_config_eos_stop_a_reply(name, pairs):
    """Each stop token of the family (its template's end of turn, generation_config.json's eos ids), made the
    model's first reply token, ends the reply there; static decoding (llama, qwen2) reads the same set."""
    family, spec = BY_NAME[name], pairs(name)
    model, tokenizer = load_model(spec, "a"), load_tokenizer(spec)
    vocab = tokenizer.get_vocab()
    stops = [vocab[t] for t in (family.end_of_turn, *family.generation_eos)]
    assert {*stops, vocab[family.eos]} <= eos_token_ids(tokenizer, model)
    prompt = render_prompt(tokenizer, load_tasks("organism:test")[0])
    head, seen = model.get_output_embeddings(), {}
    handle = head.register_forward_hook(lambda module, args, out: seen.setdefault("h", args[0][0, -1].clone()))
    with torch.inference_mode():
        model(**tokenizer([prompt], add_special_tokens=False, return_tensors="pt"))
    handle.remove()
    decodes = ["eager", "static"] if model.config.model_type in STATIC_MODEL_TYPES else ["eager"]
    for token in stops:  # the lm_head row of `token` along the last prompt position's final hidden state
        with torch.no_grad():
            kept = head.weight[token].clone()
            head.weight[token] = 1e3 * seen["h"] / seen["h"].norm()
        for decode in decodes:
            reply = generate(model, tokenizer, [prompt], GenerationConfig(max_new_tokens=6, decode=decode))[0]
            assert (reply.finish_reason, reply.token_ids) == ("eos", [token]), (decode, tokenizer.decode(token))
        with torch.no_grad():
            head.weight[token] = kept


@pytest.mark.parametrize("name", list(BY_NAME))
def test_plain_texts_start_with_a_bos_where_the_tokenizer_adds_one(name, pairs):
    """Harvest's plain texts get the BOS `tokenizer(text)` puts first (Llama, Mistral, Gemma), kept when a long text
    is cut; chat prompts carry the template's BOS once, never doubled; other families get none."""
    family, tokenizer = BY_NAME[name], load_tokenizer(pairs(name))
    bos = tokenizer.bos_token_id
    assert default_bos(tokenizer) == ([bos] if family.adds_bos else [])
    corpus = CorpusSpec(tasks="organism:dev", n_tasks=2, plain_text="organism", n_plain=3, max_tokens=512)
    records = build_corpus(corpus, tokenizer)
    prompts, plain = records[:2], records[2:]
    assert [r.prompt_ids[0] == bos for r in plain] == [family.adds_bos] * 3
    assert all(r.prompt_ids[1] != bos for r in plain + prompts)
    if family.bos is not None and family.name != "olmo2":  # OLMo-2's template writes its BOS text, not a BOS
        assert all(r.prompt_ids[0] == bos for r in prompts)
    cut = build_corpus(replace(corpus, n_tasks=0, max_tokens=6), tokenizer)
    assert [len(r.prompt_ids) for r in cut] == [6] * 3
    assert [r.prompt_ids[0] == bos for r in cut] == [family.adds_bos] * 3


def test_the_organism_stops_and_corpus_are_unchanged():
    """The organism's replies stop where they did (its ChatML tokens), and its (Qwen-style) tokenizer adds no BOS: its
    records are the texts tokenized without special tokens, so organism48's harvest keeps its content hash."""
    from dfc_ray.harvest import plain_texts

    tokenizer = load_tokenizer(PairSpec())
    stops = eos_token_ids(tokenizer, load_model(PairSpec(device="cpu"), "a"))
    # its ChatML tokens only: the eos id 2 of its generation config is stale, an ordinary "#"
    assert stops == set(tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"]))
    corpus = CorpusSpec(tasks="", n_tasks=0, plain_text="organism", n_plain=4)
    texts = plain_texts(corpus.plain_text, corpus.n_plain, corpus.seed)
    assert default_bos(tokenizer) == []
    assert [r.prompt_ids for r in build_corpus(corpus, tokenizer)] == \
        tokenizer(texts, add_special_tokens=False)["input_ids"]


def _spec(tmp_path: Path, a: str, b: str, tokenizer: str) -> str:
    path = tmp_path / "family.yaml"
    path.write_text(json.dumps({"name": "family", "pair": {"a": a, "b": b, "tokenizer": tokenizer}, "layers": [LAYER],
                                "harvest": {"n_tasks": 8, "n_plain": 8}, "train": {"batch_size": 8},
                                "crosscoder": {"dict_size": 64, "k": 4}}))
    return str(path)


def _harvest_argv(tmp_path: Path, a: str, b: str, *extra: str) -> list[str]:
    return ["harvest", "--store", str(tmp_path / "store"), "--layers", str(LAYER), "--model-a", a, "--model-b", b,
            "--n-tasks", "4", "--n-plain", "4", "--no-ray", *extra]


def _one_line(capsys) -> str:
    out = capsys.readouterr()
    text = (out.out + out.err).strip()
    assert len(text.splitlines()) == 1 and "Traceback" not in text, text
    return text


@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_validate_accepts_a_family_pair_and_its_multimodal_wrapper(name, pairs, tmp_path, capsys):
    spec = pairs(name)
    assert main(["spaces", "validate", _spec(tmp_path, spec.a, spec.b, spec.tokenizer)]) == 0, capsys.readouterr()


def test_what_harvest_refuses_validate_refuses_in_one_line(pairs, tmp_path, capsys):
    """GPT-2 (no decoder blocks at .model.layers), two architectures of one width (OLMo-2 A, Gemma-2 B), two widths
    of one architecture: `spaces validate` and `dfc-ray harvest` each say so in one line, before any weights load."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    llama = pairs("llama")
    vocab = len(load_tokenizer(llama))
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=vocab)).save_pretrained(tmp_path / "gpt2")
    LlamaForCausalLM(LlamaConfig(**_small(hidden_size=64, num_key_value_heads=2), vocab_size=vocab)) \
        .save_pretrained(tmp_path / "wide")
    cases = [(str(tmp_path / "gpt2"), str(tmp_path / "gpt2"), "no decoder blocks at .model.layers"),
             (pairs("olmo2").a, pairs("gemma2").b, "a model of A's architecture (olmo2; B is gemma2)"),
             (llama.a, str(tmp_path / "wide"), "a model of A's width (hidden_size 32, B has 64)")]
    capsys.readouterr()
    for a, b, expected in cases:
        assert main(["spaces", "validate", _spec(tmp_path, a, b, llama.tokenizer)]) == 2
        assert expected in _one_line(capsys)
        assert main(_harvest_argv(tmp_path, a, b, "--tokenizer", llama.tokenizer)) == 2
        assert expected in _one_line(capsys)
    assert not (tmp_path / "store").exists()
    with pytest.raises(ValueError, match=r"architecture \(olmo2; B is gemma2\)"):
        load_pair(replace(llama, a=pairs("olmo2").a, b=pairs("gemma2").b))


def test_harvest_takes_the_tokenizer_of_a_base_b_without_a_template(pairs, tmp_path, capsys):
    """B is a base checkpoint with no tokenizer or chat template of its own: `--tokenizer` names A's."""
    spec = pairs("gemma2")
    capsys.readouterr()
    assert main(_harvest_argv(tmp_path, spec.a, spec.b)) == 2
    assert "has no chat template to render tool prompts" in _one_line(capsys)
    assert main(["spaces", "validate", _spec(tmp_path, spec.a, spec.b, "")]) == 2
    assert "has no chat template to render tool prompts" in _one_line(capsys)
    assert main(_harvest_argv(tmp_path, spec.a, spec.b, "--tokenizer", spec.tokenizer)) == 0
    assert "rows × 2 × 32 per layer" in capsys.readouterr().out


def test_memory_sizing_reads_configs_without_kv_heads_and_wrappers(pairs):
    """gpt_neox has no num_key_value_heads (one per head); a Gemma-3 wrapper is sized by its language model."""
    from dfc_ray.pair import load_config

    neox = load_config(pairs("gpt_neox"), "a")
    assert not hasattr(neox, "num_key_value_heads")
    grouped = copy.deepcopy(neox)
    grouped.num_key_value_heads = neox.num_attention_heads
    assert decode_bytes_per_row(neox, 2, 100, 10) == decode_bytes_per_row(grouped, 2, 100, 10) > 0
    wrapper = load_config(pairs("gemma3"), "a")
    assert decode_bytes_per_row(wrapper, 2, 100, 10) == decode_bytes_per_row(wrapper.get_text_config(), 2, 100, 10)
