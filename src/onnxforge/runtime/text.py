"""Text generation with a GPT-2 style ONNX decoder (with or without KV cache)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .artifact import Artifact, load


@dataclass(frozen=True)
class SamplingSettings:
    max_new_tokens: int = 48
    greedy: bool = False
    temperature: float = 0.8
    top_k: int = 50  # 0 = off
    top_p: float = 0.95  # 1.0 = off
    repetition_penalty: float = 1.2  # 1.0 = off
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self):
        if self.max_new_tokens <= 0:
            raise ValueError(f"max tokens must be at least 1 (got {self.max_new_tokens})")
        if not self.greedy and self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 (got {self.temperature}); use greedy decoding for a deterministic argmax")
        if self.top_k < 0:
            raise ValueError(f"top-k must be >= 0, 0 meaning off (got {self.top_k})")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top-p must be in (0, 1] (got {self.top_p})")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition penalty must be > 0, 1 meaning off (got {self.repetition_penalty})")


def pick_token(logits: np.ndarray, history: list[int], s: SamplingSettings, rng: np.random.Generator) -> int:
    """Choose the next token from one row of logits."""
    logits = logits.astype(np.float64, copy=True)
    if s.repetition_penalty != 1.0 and history:
        # CTRL-style penalty, as transformers applies it: shrink the scores of seen tokens.
        seen = np.unique(np.asarray(history))
        seen = seen[seen < logits.shape[0]]
        vals = logits[seen]
        logits[seen] = np.where(vals > 0, vals / s.repetition_penalty, vals * s.repetition_penalty)
    if s.greedy:
        return int(np.argmax(logits))
    logits /= s.temperature
    if s.top_k and s.top_k < logits.shape[0]:
        kth = np.partition(logits, -s.top_k)[-s.top_k]
        logits[logits < kth] = -np.inf
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    if s.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cumulative = np.cumsum(probs[order])
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        cut = int(np.searchsorted(cumulative, s.top_p) + 1)
        mask = np.zeros_like(probs, dtype=bool)
        mask[order[:cut]] = True
        probs = np.where(mask, probs, 0.0)
        probs /= probs.sum()
    return int(rng.choice(probs.shape[0], p=probs))


class CausalLM:
    """One ONNX decoder: `input_ids, attention_mask, position_ids [, past_key_values.*]` -> `logits [, present.*]`."""

    def __init__(self, session, context_length: int):
        self.sess = session
        self.context_length = context_length
        inputs = {i.name: i for i in session.get_inputs()}
        self.input_names = set(inputs)
        self.past_names = [n for n in inputs if n.startswith("past_key_values.")]
        self.present_names = [o.name for o in session.get_outputs() if o.name.startswith("present.")]
        self.has_past = bool(self.past_names)
        self.past_shapes = {}
        for name in self.past_names:
            _, heads, _, head_dim = inputs[name].shape
            self.past_shapes[name] = (int(heads), int(head_dim))

    def _run(self, ids: np.ndarray, past: dict | None, past_len: int):
        seq = ids.shape[1]
        feed = {"input_ids": ids.astype(np.int64)}
        if "attention_mask" in self.input_names:
            feed["attention_mask"] = np.ones((1, past_len + seq), dtype=np.int64)
        if "position_ids" in self.input_names:
            feed["position_ids"] = np.arange(past_len, past_len + seq, dtype=np.int64)[None, :]
        if self.has_past:
            feed.update(past if past is not None else self.empty_past())
        outputs = self.sess.run(None, feed)
        present = dict(zip([n.replace("present.", "past_key_values.") for n in self.present_names], outputs[1:]))
        return outputs[0][0], present

    def empty_past(self) -> dict:
        return {n: np.zeros((1, h, 0, d), dtype=np.float32) for n, (h, d) in self.past_shapes.items()}

    def full_logits(self, ids: list[int]) -> np.ndarray:
        """Logits for every position of `ids` in one pass (no cache)."""
        logits, _ = self._run(np.asarray([ids]), None, 0)
        return logits

    def decode(self, prompt_ids: list[int], use_cache: bool = True):
        """A generator of next-token logits: send() it each chosen token.

        With a cache, each step feeds only the new token; without one, the
        whole sequence again (the `base` variant, or a check of the cache).
        """
        use_cache = use_cache and self.has_past
        ids = list(prompt_ids)
        logits, past = self._run(np.asarray([ids]), None, 0)
        while True:
            token = yield logits[-1]
            ids.append(token)
            if len(ids) >= self.context_length:
                return
            if use_cache:
                logits, past = self._run(np.asarray([[token]]), past, len(ids) - 1)
            else:
                logits, _ = self._run(np.asarray([ids]), None, 0)

    def greedy(self, prompt_ids: list[int], n: int, use_cache: bool = True) -> list[int]:
        out: list[int] = []
        stream = self.decode(prompt_ids, use_cache)
        logits = next(stream)
        while len(out) < n:
            out.append(int(np.argmax(logits)))
            try:
                logits = stream.send(out[-1])
            except StopIteration:
                break
        return out


@dataclass
class Generation:
    prompt: str
    text: str
    token_ids: list[int]
    finish_reason: str  # "eos" | "stop" | "length" | "context"
    prefill_ms: float
    decode_ms_per_token: list[float] = field(default_factory=list)


class TextGenerator:
    """Tokenizer + decoder + prompt template, all from one artifact."""

    def __init__(self, artifact: str | Path | Artifact, threads: int | None = None):
        self.artifact = load(artifact, expect_kind="causal-lm")
        rt = self.artifact.runtime
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(self.artifact.dir / rt["tokenizer"]))
        self.eos_id = rt["eos_token_id"]
        self.template = rt["prompt_template"]
        self.lm = CausalLM(self.artifact.session("decoder", threads=threads), rt["context_length"])

    def creative_prompt(self, word: str) -> str:
        return self.template.format(word=word.strip())

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def generate(self, text: str, settings: SamplingSettings = SamplingSettings(), use_template: bool = True) -> Generation:
        if not text or not text.strip():
            raise ValueError("empty prompt: give a word or phrase, e.g. `onnxforge generate lighthouse`")
        prompt = self.creative_prompt(text) if use_template else text
        ids = self.encode(prompt)
        if len(ids) >= self.lm.context_length:
            raise ValueError(f"prompt is {len(ids)} tokens; this model's context is {self.lm.context_length}: shorten it")
        rng = np.random.default_rng(settings.seed)
        out: list[int] = []
        t0 = time.perf_counter()
        stream = self.lm.decode(ids)
        logits = next(stream)
        prefill_ms = (time.perf_counter() - t0) * 1e3
        step_ms: list[float] = []
        reason = "length"
        while len(out) < settings.max_new_tokens:
            token = pick_token(logits, ids + out, settings, rng)
            if token == self.eos_id:
                reason = "eos"
                break
            out.append(token)
            if settings.stop:
                text_so_far = self.tokenizer.decode(out)
                if any(s in text_so_far for s in settings.stop):
                    reason = "stop"
                    break
            if len(out) == settings.max_new_tokens:
                break
            t0 = time.perf_counter()
            try:
                logits = stream.send(token)
            except StopIteration:
                reason = "context"
                break
            step_ms.append((time.perf_counter() - t0) * 1e3)
        completion = self.tokenizer.decode(out)
        if reason == "stop":
            cut = min(completion.find(s) for s in settings.stop if s in completion)
            completion = completion[:cut]
        return Generation(prompt, prompt + completion, out, reason, prefill_ms, step_ms)
