"""Text generation with a GPT-2 style ONNX decoder (with or without KV cache)."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .artifact import Artifact, load

# Word budget of a creative prompt. It feeds Stable Diffusion's CLIP text encoder,
# which reads 75 tokens (77 with BOS/EOS). The text runtime has no CLIP tokenizer
# (it belongs to the SD artifact), so the limit is approximated by words, on the
# safe side: the real CLIP vocabulary spends ~1.3 tokens per English word, but the
# sd-tiny tokenizer (small vocabulary, plus the tiny GPT-2's invented words) was
# measured at up to 2.84 tokens per word, so 25 words * 3 tokens = 75.
PROMPT_MAX_WORDS = 25
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*(?=\s|$)")


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
    finish_reason: str  # "eos" | "stop" | "length" | "context" | "words" (creative prompt's word budget)
    prefill_ms: float
    decode_ms_per_token: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # one line each, for the user (e.g. the context was reached)


class TextGenerator:
    """Tokenizer + decoder + prompt template, all from one artifact."""

    def __init__(self, artifact: str | Path | Artifact, threads: int | None = None):
        self.artifact = load(artifact, expect_kind="causal-lm")
        rt = self.artifact.runtime
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(self.artifact.dir / rt["tokenizer"]))
        self.eos_id = rt["eos_token_id"]
        self.template = rt["prompt_template"]
        # Recipe defaults (runtime section), read with the old defaults for artifacts that predate them.
        self.repetition_penalty = float(rt.get("repetition_penalty", 1.2))
        self.prompt_includes_template = bool(rt.get("prompt_includes_template", True))
        self.lm = CausalLM(self.artifact.session("decoder", threads=threads), rt["context_length"])

    def template_prompt(self, word: str) -> str:
        """The recipe's prompt template around the word: the start of a creative prompt."""
        return self.template.format(word=word.strip())

    def _template_repeat_marks(self) -> tuple[str, ...]:
        # The tiny model was trained on lines that each start with the template, so
        # it tends to begin a new line and repeat it. A line break ends the prompt,
        # and so does the opening of any template piece of 2+ words (its first 3 words).
        pieces = [p.split() for p in self.template.split("{word}")]
        return ("\n",) + tuple(" ".join(p[:3]) for p in pieces if len(p) >= 2)

    def creative_prompt(self, word: str, settings: SamplingSettings = SamplingSettings(),
                        max_words: int = PROMPT_MAX_WORDS) -> Generation:
        """The template around `word`, continued by the model into an image prompt of at most
        `max_words` words (see PROMPT_MAX_WORDS) that never repeats the template and ends at a
        sentence end or, failing that, after the last complete word."""
        if isinstance(max_words, bool) or not isinstance(max_words, (int, np.integer)) or max_words < 1:
            raise ValueError(f"max words must be a whole number >= 1, got {max_words!r}")
        prompt = self.template_prompt(word)
        stops = self._template_repeat_marks() + tuple(settings.stop)
        g = self._sample(prompt, settings, stops, max_words)
        completion = g.text[len(prompt):]
        if g.finish_reason in ("length", "context"):
            # Cut off after a token: its last word may be unfinished ("... Its meta"), drop it.
            completion = completion[:completion.rstrip().rfind(" ") + 1] if completion.strip() else ""
        ends = list(_SENTENCE_END.finditer(completion))
        if ends:
            completion = completion[:ends[-1].end()]
        completion = completion.rstrip().rstrip(",;:").rstrip()
        g.text = prompt + completion if self.prompt_includes_template else completion.strip()
        if len(prompt.split()) >= max_words:
            g.notes.append(f"the prompt template and word already use {len(prompt.split())} of the {max_words} words "
                           "a creative prompt may have: nothing was added")
        return g

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def generate(self, text: str, settings: SamplingSettings = SamplingSettings(), use_template: bool = True) -> Generation:
        """A creative prompt from a word (see creative_prompt), or with use_template=False a plain
        continuation of `text`."""
        if not text or not text.strip():
            raise ValueError("empty prompt: give a word or phrase, e.g. `onnxforge generate lighthouse`")
        if use_template:
            return self.creative_prompt(text, settings)
        return self._sample(text, settings, tuple(settings.stop))

    def _gluing_tokens(self, size: int) -> np.ndarray:
        """Mask of the token ids whose text starts with an ASCII letter or digit (they would extend the
        previous word). ASCII only: scripts written without spaces must stay free to continue."""
        if getattr(self, "_glue", None) is None or len(self._glue) != size:
            n = min(size, self.tokenizer.get_vocab_size())
            texts = self.tokenizer.decode_batch([[i] for i in range(n)], skip_special_tokens=True)
            self._glue = np.zeros(size, dtype=bool)
            self._glue[:n] = [t[:1].isascii() and t[:1].isalnum() for t in texts]
        return self._glue

    def _sample(self, prompt: str, settings: SamplingSettings, stops: tuple[str, ...],
                max_words: int | None = None) -> Generation:
        """Sample a continuation of `prompt`; stop at EOS, a stop string (cut before it), max_new_tokens,
        the model's context, or once the text has more than max_words words (cut before that word)."""
        ids = self.encode(prompt)
        if len(ids) >= self.lm.context_length:
            raise ValueError(f"prompt is {len(ids)} tokens; this model's context is {self.lm.context_length}: shorten it")
        rng = np.random.default_rng(settings.seed)
        out: list[int] = []
        t0 = time.perf_counter()
        stream = self.lm.decode(ids)
        logits = next(stream)
        prefill_ms = (time.perf_counter() - t0) * 1e3
        if prompt[-1:].isascii() and prompt[-1:].isalnum():
            # The prompt is whole words ("The dragon"): the continuation starts a new word rather
            # than gluing a word piece onto the last one ("The dragonoded"), which a small model's
            # argmax otherwise can do.
            logits = np.where(self._gluing_tokens(logits.shape[-1]), -np.inf, logits)
        step_ms: list[float] = []
        reason = "length"
        completion = ""
        head = self.tokenizer.decode(ids)
        while len(out) < settings.max_new_tokens:
            token = pick_token(logits, ids + out, settings, rng)
            if token == self.eos_id:
                reason = "eos"
                break
            out.append(token)
            # Decoded together with the prompt: a decoder that drops a leading space when
            # decoding the new tokens alone (SentencePiece-style) still gets the spacing right.
            full = self.tokenizer.decode(ids + out)
            completion = full[len(head):] if full.startswith(head) else self.tokenizer.decode(out)
            hits = [completion.find(s) for s in stops if s and s in completion]
            if hits:
                completion, reason = completion[:min(hits)], "stop"
                break
            if max_words is not None:
                words = list(re.finditer(r"\S+", prompt + completion))
                if len(words) > max_words:
                    # The (max_words + 1)-th word has begun, so the ones before it are complete.
                    cut = max(words[max_words].start() - len(prompt), 0)
                    completion, reason = completion[:cut], "words"
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
        notes = []
        if reason == "context":
            notes.append(f"stopped at this model's context of {self.lm.context_length} tokens ({len(ids)} prompt + "
                         f"{len(out)} new), short of max tokens {settings.max_new_tokens}")
        return Generation(prompt, prompt + completion, out, reason, prefill_ms, step_ms, notes)
