"""First-contact self-checks (dfc_ray/selfcheck.py): a wrong fast path, injected on CPU, is caught, replaced by its
reference for the rest of the process, logged once and recorded; correct ones pass; `dfc-ray doctor` reports them."""

from __future__ import annotations

import logging

import pytest
import torch

from dfc_ray import kernels, selfcheck
from dfc_ray.crosscoder import DedicatedFeatureCrosscoder, DFCConfig, resolve_formulation
from dfc_ray.generation import GenerationConfig, _StaticStep, generate
from dfc_ray.train import TrainConfig, train

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def checks_on_cpu(monkeypatch):
    """Run the checks on this CPU as they would run on a CUDA device; forget every verdict around each test."""
    monkeypatch.setattr(selfcheck, "FORCE_CPU", True)
    selfcheck.reset()
    yield
    selfcheck.reset()


def _corrupt_dense_decoder(monkeypatch):
    decode = DedicatedFeatureCrosscoder._decode_flat

    def wrong(self, *args, dense=False, **kwargs):
        out = decode(self, *args, dense=dense, **kwargs)
        return out + 0.5 if dense else out

    monkeypatch.setattr(DedicatedFeatureCrosscoder, "_decode_flat", wrong)


def test_correct_fast_paths_pass_their_checks():
    assert resolve_formulation("dense", CPU) == (True, True) and resolve_formulation("hybrid", CPU) == (True, False)
    assert [r.path for r in selfcheck.results()] == ["train.dense", "train.hybrid"]
    assert all(r.ok and r.error <= 1e-4 for r in selfcheck.results()) and selfcheck.fallbacks() == []


def test_a_first_use_under_inference_mode_checks_with_gradients():
    """A judge's `encode` under inference mode may be a process's first use of the dense path: its check still
    runs a training step, so a correct path is not replaced because of where it was first met."""
    with torch.inference_mode():
        assert resolve_formulation("dense", CPU) == (True, True)
    assert selfcheck.fallbacks() == []


def test_a_wrong_dense_formulation_falls_back_to_sparse_once_logged_and_recorded(monkeypatch, caplog):
    _corrupt_dense_decoder(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="dfc_ray"):
        assert resolve_formulation("dense", CPU) == (False, False)
        assert resolve_formulation("auto", CPU) == resolve_formulation("dense", CPU) == (False, False)
    warnings = [r.getMessage() for r in caplog.records if "self-check" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("self-check: train.dense on cpu: error ")
    assert warnings[0].endswith("FALLBACK to the reference path")
    assert len(selfcheck.fallbacks()) == 1 and selfcheck.fallbacks()[0].startswith("train.dense on cpu")

    # a run asked to train densely trains exactly as the sparse reference does
    dfc = DFCConfig(d_model=16, dict_size=64, k=4, a_exclusive=0.1, b_exclusive=0.1)
    batches = [torch.randn(32, 2, 16, generator=torch.Generator().manual_seed(i)) for i in range(6)]
    runs = [train(dfc, TrainConfig(steps=6, lr=1e-3, formulation=name, seed=0), iter(batches)).metrics["loss"]
            for name in ("dense", "sparse")]
    assert runs[0] == runs[1]


def test_a_check_that_raises_counts_as_a_failed_check():
    def broken(device):
        raise RuntimeError("no kernel image is available for execution on the device\nsecond line")

    assert not selfcheck.first_contact("train.demo", CPU, broken)
    (line,) = selfcheck.fallbacks()
    assert "RuntimeError: no kernel image is available" in line and "second line" not in line


def test_wrong_kernels_are_not_used(monkeypatch):
    monkeypatch.setattr(kernels, "FORCE", True)
    monkeypatch.setattr(kernels, "segment_sum", lambda offsets, idx, w, y, dtype: torch.zeros(len(offsets) - 1,
                                                                                               y.shape[1]))
    monkeypatch.setattr(kernels, "gathered_dots", lambda a_idx, b_idx, a, b: torch.zeros(len(a_idx)))
    assert not kernels.active(torch.zeros(1))
    assert selfcheck.fallbacks()[0].startswith("kernels.triton on cpu")


def test_wrong_static_decoding_falls_back_to_eager(tiny_pair, monkeypatch):
    from transformers import AutoTokenizer, Qwen2ForCausalLM

    model = Qwen2ForCausalLM.from_pretrained(tiny_pair.a).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_pair.tokenizer)
    prompts = ["hello there", "the weather in paris"]
    eager = generate(model, tokenizer, prompts, GenerationConfig(max_new_tokens=6, decode="eager"))
    forward = _StaticStep.forward

    def wrong(self):
        forward(self)
        self.out.add_(1)  # every generated token id off by one

    monkeypatch.setattr(_StaticStep, "forward", wrong)
    static = generate(model, tokenizer, prompts, GenerationConfig(max_new_tokens=6, decode="static"))
    assert [g.token_ids for g in static] == [g.token_ids for g in eager]
    (line,) = selfcheck.fallbacks()
    assert line.startswith("decode.static:Qwen2ForCausalLM on cpu: error ")


def test_doctor_reports_every_check_on_cpu(capsys):
    from dfc_ray.cli import main

    assert main(["doctor", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for line in ("training formulation (auto)", "decoding (auto)", "check train.dense", "check train.hybrid",
                 "check decode.static:Qwen2ForCausalLM", "torch", "transformers"):
        assert line in out


def test_the_report_header_names_every_fallback_with_its_trial_count():
    from dfc_ray.report.build import TrialResult, build_report
    from dfc_ray.report.render import header_lines

    line = "train.dense on cuda:0: error 0.3 (tolerance 0.0001) FALLBACK to the reference path"
    trials = [TrialResult("t1", {"k": 8}, {"fast_path_fallbacks": [line]}), TrialResult("t2", {"k": 16}, {}),
              TrialResult("t3", {"k": 32}, {"fast_path_fallbacks": [line]})]
    report = build_report(trials)
    assert report["fast_path_fallbacks"] == {line: 2}
    assert f"FAST PATH REPLACED by its reference after a failed self-check, in 2 trials: {line}" in header_lines(report)
    assert "fast_path_fallbacks" not in build_report(trials[1:2])
