"""A synthetic workload for wall-clock benchmarks: a (small, large) model pair, at any shape,
whose sampled text has reasoning steps of a stated length distribution.

Why: random weights write text with no steps, and real weights are not at hand at every shape, yet
a benchmark's time depends on how long steps are (a round waits for its longest step). So the
law is enforced by the model itself, and the decode engine runs exactly as for a real checkpoint.

How: every layer's attention output `o` and MLP `down` are zero (q/k/v/gate/up stay random: the
compute is the real one), so the residual stream is exactly the token's embedding and the model an
exact bigram (Markov) chain, written into `embed` and an untied `lm_head`:

- states: "step start" (prompt words, the delimiter "\\n\\n", EOS, pad) and K length classes of
  `per_class` plain words each, drawn uniformly so the text is not constant;
- from step start the next token is a class-k word with probability w_k; a class-k word is
  followed by another class-k word with probability 1 - h_k, else by the delimiter (1 - q) or
  EOS (q = 1 / mean_steps): steps per trace ~ Geometric(q);
- a step's LENGTH L counts its tokens, first word through the delimiter or EOS ending it, both
  included (L >= 2): in class k, L - 1 ~ Geometric(h_k) on {1, 2, ...}, h_k = 1 / (means[k] - 1).

Why exact in bfloat16 too: a token of state s embeds as 16 in s's two dimensions and in an
always-on one, a jitter j in a shift dimension, a few pad dimensions balancing j, and +-8 (random
signs) everywhere else, so every row's sum of squares is exactly 64 * hidden_size: RMSNorm's scale
is 1/8 for all tokens and the normed values (2, +-1, j/8) are exact in bfloat16. The head writes
each logit temperature * log p as a rounded value plus its rounding residual (through s's second
dimension): log p is off by ~1e-4 in bfloat16, not the 0.08 of one rounded value. The shift
dimension adds the same jitter * j / 16 to all next-token logits: the max logit (the step
confidence) varies per token, the sampled distribution not at all.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from steer_jax.decoding.steps import token_texts
from steer_jax.modeling import execution, qwen2
from steer_jax.modeling.config import ModelConfig, RopeConfig
from steer_jax.modeling.module import init_params, layout
from steer_jax.modeling.transformer import KVCache, Model, forward, logits

REPO = Path(__file__).resolve().parents[1]
HF_DIR = Path(os.environ.get("STEER_SHARED_DATA", REPO.parent / "shared" / "data")) / "hf"

DELIMITER = "\n\n"
PAD, EOS, DELIM = 0, 1, 2
N_PROMPT = 32  # prompt words: ids 3 .. 34
CLASS_BASE = 3 + N_PROMPT  # class k's words: CLASS_BASE + k * per_class + (0 .. per_class - 1)
STATE_VALUE, FILL, JITTER_MAX = 16, 8, 16  # embedding values; hidden = these / 8
IMPOSSIBLE = 40.0  # logits this far below the most likely token: exp(-40 / 0.7) ~ 1e-25


@dataclasses.dataclass(frozen=True)
class StepLengths:
    """A step-length law: a mixture of geometrics (weights, means of L), and the mean number of
    steps per trace. Length L counts a step's tokens including the delimiter/EOS ending it.

    The default approximates the benchmark's real step lengths, a lognormal of median 35 tokens
    and sigma 0.9, fitted once offline (scipy Nelder-Mead on the squared log-quantile errors at
    p50..p99.9 plus 10 x the squared KS distance to the lognormal rounded to integers; weights
    >= 3%, each mean >= 2x the one before):

        quantile     p10  p25  p50  p75  p90  p95  p99  p99.9  mean  P(L > 256)
        mixture        7   15   35   70  119  158  274    572  53.0       1.23%
        lognormal     11   19   35   64  111  154  284    565  52.5       1.34%

    Median, p90 and p99 match within 8%, and the engine's 256-token step cap is reached about as
    often as the lognormal would reach it. Two things no mixture of geometrics can do: have an
    interior mode (each component's pmf falls from L = 2), so short steps are too frequent
    (p10 7 against 11; KS distance 0.080 at L = 10, 0.030 above the median); and the unconstrained
    optimum uses only two distinct components (a geometric's CV is already ~1, the lognormal's
    1.1), so three classes (short, typical, long) cost nothing in fit but are not needed by it.
    """

    weights: tuple[float, ...] = (0.03, 0.93, 0.04)
    means: tuple[float, ...] = (25.0, 49.5, 156.0)
    mean_steps: float = 12.0

    def __post_init__(self) -> None:
        if len(self.weights) != len(self.means) or not self.weights:
            raise ValueError("weights and means must be non-empty and of one length")
        if abs(sum(self.weights) - 1.0) > 1e-9 or min(self.weights) < 0:
            raise ValueError(f"weights must be >= 0 and sum to 1, got {self.weights}")
        if min(self.means) < 2:
            raise ValueError(f"a step has at least 2 tokens (a word and its end): {self.means}")
        if self.mean_steps < 1:
            raise ValueError(f"mean_steps must be >= 1, got {self.mean_steps}")

    @classmethod
    def geometric(cls, mean: float, mean_steps: float = 12.0) -> StepLengths:
        """One class: L - 1 geometric, E[L] = mean."""
        return cls((1.0,), (float(mean),), mean_steps)

    @property
    def hazards(self) -> np.ndarray:
        """Per class, the probability that a word is the step's last word."""
        return 1.0 / (np.asarray(self.means, np.float64) - 1.0)

    @property
    def eos_prob(self) -> float:
        """Probability that a step ends the trace (EOS instead of the delimiter)."""
        return 1.0 / self.mean_steps

    @property
    def mean(self) -> float:
        return float(np.dot(self.weights, self.means))

    def pmf(self, n: Any) -> np.ndarray:
        n, h = np.asarray(n, np.int64), self.hazards
        terms = h * (1.0 - h) ** np.maximum(n - 2, 0)[..., None]
        return np.where(n >= 2, terms @ np.asarray(self.weights), 0.0)

    def cdf(self, n: Any) -> np.ndarray:
        """P(L <= n)."""
        n, h = np.asarray(n, np.int64), self.hazards
        return (1.0 - (1.0 - h) ** np.maximum(n - 1, 0)[..., None]) @ np.asarray(self.weights)

    def quantile(self, p: float) -> int:
        """The smallest n with P(L <= n) >= p."""
        n = np.arange(1, 2 + int(100 * max(self.means)))  # P(L > that) < e**-100
        return int(n[np.searchsorted(self.cdf(n), p)])


# ---- vocabulary and tokenizer -------------------------------------------------------------------

def _word(i: int) -> str:
    """The i-th of 4900 distinct two-syllable words: no newline, digit or operator in them."""
    c, v = "bdfgklmnprstvz", "aeiou"
    return c[i % 14] + v[i // 14 % 5] + c[i // 70 % 14] + v[i // 980 % 5]


def vocab_texts(classes: int, per_class: int = 16) -> list[str]:
    """Token texts by id: pad, EOS, the delimiter, prompt words (capitalized), class words."""
    prompt = [_word(i).capitalize() for i in range(N_PROMPT)]
    return ["<pad>", "<|endoftext|>", DELIMITER, *prompt,
            *(_word(i) for i in range(classes * per_class))]


def make_tokenizer(classes: int, per_class: int = 16) -> Any:
    """A word-level HF tokenizer over `vocab_texts` (EOS "<|endoftext|>", pad "<pad>")."""
    import transformers as tf
    from tokenizers import Tokenizer, models

    texts = vocab_texts(classes, per_class)
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(texts)}, unk_token="<pad>"))
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                      pad_token="<pad>")


def prompts(n: int, length: int = 16, seed: int = 0) -> list[list[int]]:
    """n prompts of `length` prompt words each, drawn uniformly."""
    rng = np.random.default_rng(seed)
    return (3 + rng.integers(0, N_PROMPT, (n, length))).tolist()


# ---- the designed chain -------------------------------------------------------------------------

def token_states(classes: int, per_class: int = 16) -> np.ndarray:
    """Each token's state: 0 step start, k + 1 class k."""
    states = np.zeros(CLASS_BASE + classes * per_class, np.int64)
    states[CLASS_BASE:] = 1 + np.arange(classes * per_class) // per_class
    return states


def transition_probs(lengths: StepLengths, per_class: int = 16) -> np.ndarray:
    """[K + 1 states, tokens]: the designed next-token distribution of each state."""
    K = len(lengths.weights)
    probs = np.zeros((K + 1, CLASS_BASE + K * per_class))
    words = lambda k: slice(CLASS_BASE + k * per_class, CLASS_BASE + (k + 1) * per_class)
    q = lengths.eos_prob
    for k, (w, h) in enumerate(zip(lengths.weights, lengths.hazards)):
        probs[0, words(k)] = w / per_class
        probs[k + 1, words(k)] = (1.0 - h) / per_class
        probs[k + 1, DELIM] = h * (1.0 - q)
        probs[k + 1, EOS] = h * q
    return probs


def _squares(total: int, parts: int) -> list[int] | None:
    """`parts` non-negative integers whose squares sum to `total` (4 parts always exist)."""
    if parts == 1:
        a = math.isqrt(total)
        return [a] if a * a == total else None
    for a in range(math.isqrt(total), -1, -1):
        rest = _squares(total - a * a, parts - 1)
        if rest is not None:
            return [a, *rest]
    return None


def _round(x: np.ndarray, dtype: Any) -> np.ndarray:
    return np.asarray(x, np.float32).astype(dtype).astype(np.float32)


def design(lengths: StepLengths, hidden: int, *, temperature: float = 0.7,
           per_class: int = 16, jitter: float = 1.0, top_logit: float = 20.0, seed: int = 0,
           dtype: Any = jnp.float32) -> dict[str, Any]:
    """The designed rows of `embed` and `lm_head` (float32, values exact in `dtype`), the head's
    always-on and shift columns (the same for every token id), in numpy."""
    K = len(lengths.weights)
    states = token_states(K, per_class)
    n = len(states)
    # Dimensions: state s reads s and K + 1 + s; then always-on, shift, pads; the rest is fill.
    on, shift = 2 * (K + 1), 2 * (K + 1) + 1
    pads = max(4, 12 - 2 * K)  # enough that j**2 + pads' squares can balance any |j| <= 16
    used = shift + 1 + pads
    assert used <= hidden, f"{K + 1} states need {used} hidden dimensions, the model has {hidden}"
    balance = FILL**2 * used - 3 * STATE_VALUE**2  # sum of squares left for shift and pads
    rng = np.random.default_rng(seed)
    embed = FILL * rng.choice([-1.0, 1.0], size=(n, hidden))
    embed[:, :used] = 0.0
    rows = np.arange(n)
    for d in (states, K + 1 + states, np.full(n, on)):
        embed[rows, d] = STATE_VALUE
    j = rng.integers(-JITTER_MAX, JITTER_MAX + 1, n)
    embed[:, shift] = j
    for i in range(n):
        fill = np.asarray(_squares(int(balance - j[i] ** 2), pads), np.float64)
        embed[i, shift + 1:used] = rng.permutation(fill) * rng.choice([-1.0, 1.0], pads)
    a = STATE_VALUE / FILL  # a state dimension's value after RMSNorm: exactly 2
    with np.errstate(divide="ignore"):
        logp = np.log(transition_probs(lengths, per_class))
    target = temperature * (logp - logp.max(axis=1, keepdims=True)) + top_logit
    target = np.where(np.isfinite(target), target, top_logit - IMPOSSIBLE)  # [K + 1, n]
    main = _round(target / a, dtype)
    residual = _round((target - main * a) / a, dtype)
    head = np.zeros((n, hidden))
    head[:, : K + 1], head[:, K + 1: 2 * (K + 1)] = main.T, residual.T
    scale = jitter * FILL / JITTER_MAX  # shift logit = scale * j / 8, within +-jitter
    head[:, shift] = scale
    return dict(embed=embed.astype(np.float32), head=head.astype(np.float32),
                on=(top_logit - IMPOSSIBLE) / a, on_dim=on, shift=scale, shift_dim=shift)


@functools.partial(jax.jit, static_argnames=("cfg", "dtype", "on_dim", "shift_dim"))
def _params(cfg: ModelConfig, key: jax.Array, embed: jax.Array, head: jax.Array, on: jax.Array,
            shift: jax.Array, *, dtype: Any, on_dim: int, shift_dim: int) -> dict[str, Any]:
    # One program, so a 7B pair is built on the accelerator without host copies.
    params = init_params(cfg, key, dtype)
    layers = dict(params["layers"])
    layers["o"], layers["down"] = jnp.zeros_like(layers["o"]), jnp.zeros_like(layers["down"])
    V, D = cfg.vocab_size, cfg.hidden_size
    n = embed.shape[0]
    # Token ids past the designed ones: zero embedding, never written (IMPOSSIBLE below the rest).
    big = jnp.zeros((V, D), dtype).at[:n].set(embed.astype(dtype))
    lm = jnp.zeros((V, D), dtype).at[:, on_dim].set(on.astype(dtype))
    lm = lm.at[:, shift_dim].set(shift.astype(dtype)).at[:n].set(head.astype(dtype))
    return dict(params, layers=layers, embed=big, lm_head=lm, final_norm=jnp.ones((D,), dtype))


# ---- shapes and models --------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Shape:
    """A (small, large) pair of configs and the parameter dtype they run in by default."""

    small: ModelConfig
    large: ModelConfig
    dtype: str


def _toy(hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int,
         vocab: int, context: int = 2048) -> ModelConfig:
    # 2048 positions: a 16-token prompt and 1024 new tokens fit with room to spare.
    return qwen2.config_from_hf(dict(
        model_type="qwen2", vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=context, rope_theta=10000.0, tie_word_embeddings=False,
        eos_token_id=EOS, pad_token_id=PAD))


def _real(folder: str, fallback: str, **changes: Any) -> ModelConfig:
    """A checkpoint's config from ../shared/data/hf when present, else the repo's hard-coded
    copy of the published one; untied (the chain needs its own head: the decode step's head
    matmul is the same V x D either way) and with this workload's EOS."""
    from steer_jax.modeling.loading import read_config

    path = HF_DIR / folder
    if (path / "config.json").is_file():
        cfg = dataclasses.replace(read_config(path), **changes)
    else:
        cfg = qwen2.known(fallback)
    return dataclasses.replace(cfg, tie_embeddings=False, eos_token_ids=(EOS,),
                               bos_token_id=None, pad_token_id=PAD)


# Qwen2.5-Math-7B's config.json is not in ../shared/data/hf; Qwen2.5-7B-Instruct's is, with the
# same dimensions (hidden 3584, 28 layers, 28/4 heads, intermediate 18944, vocab 152064): only its
# RoPE base (1e6 against 1e4) and context (32k against 4k) differ, set here to Math-7B's.
_MATH_ROPE = dict(rope_global=RopeConfig(10000.0), rope_local=RopeConfig(10000.0),
                  max_position_embeddings=4096)
SHAPES: dict[str, Shape] = {
    # For the test suite: seconds to compile and run.
    "test": Shape(_toy(32, 1, 2, 1, 64, 128), _toy(64, 2, 4, 2, 128, 128), "float32"),
    # The CPU pair: 2.1M and 13.1M parameters (1/6.2), decode-step time grows with rows.
    "tiny": Shape(_toy(256, 2, 4, 2, 768, 1024), _toy(512, 4, 8, 2, 1536, 1024), "float32"),
    # Wider and shallower, one KV head: attention over a ~500-token cache weighs less against the
    # weights (as in real models), so the small step costs nearer its share of the parameters.
    "tiny-wide": Shape(_toy(384, 1, 6, 1, 1024, 1024), _toy(640, 3, 10, 1, 1792, 1024),
                       "float32"),
    "Qwen2.5-Math-1.5B/7B": Shape(
        _real("Qwen2.5-Math-1.5B", "Qwen2.5-Math-1.5B-Instruct"),
        _real("Qwen2.5-7B-Instruct", "Qwen2.5-Math-7B-Instruct", **_MATH_ROPE), "bfloat16"),
}


def _like_load_model(cfg: ModelConfig, params: dict[str, Any],
                     dtype: Any) -> tuple[ModelConfig, dict[str, Any]]:
    """The execution and layout `load_model` gives the same checkpoint, so the benchmark times
    what users run."""
    cfg = dataclasses.replace(cfg, execution=execution.choose(dtype))
    return cfg, layout(cfg, params)


def build_model(cfg: ModelConfig, lengths: StepLengths, seed: Sequence[int], dtype: Any, *,
                temperature: float = 0.7, per_class: int = 16, jitter: float = 1.0,
                like_load_model: bool = True) -> Model:
    """One model of the chain: random q/k/v/gate/up and jitter from `seed`."""
    if cfg.family != "qwen2" or cfg.tie_embeddings or cfg.final_logit_softcap:
        raise ValueError("the chain needs a Qwen2-style config with an untied head")
    d = design(lengths, cfg.hidden_size, temperature=temperature, per_class=per_class,
               jitter=jitter, seed=int(np.random.SeedSequence(seed).generate_state(1)[0]),
               dtype=dtype)
    if len(d["embed"]) > cfg.vocab_size:
        raise ValueError(f"{len(d['embed'])} tokens do not fit a vocabulary of {cfg.vocab_size}")
    key = jax.random.key(int(np.random.SeedSequence([*seed, 1]).generate_state(1)[0]))
    params = _params(cfg, key, jnp.asarray(d["embed"]), jnp.asarray(d["head"]),
                     jnp.float32(d["on"]), jnp.float32(d["shift"]), dtype=jnp.dtype(dtype),
                     on_dim=d["on_dim"], shift_dim=d["shift_dim"])
    if like_load_model:
        cfg, params = _like_load_model(cfg, params, dtype)
    return Model(cfg, params, None)


def build_pair(shape: str | Shape, lengths: StepLengths = StepLengths(), seed: int = 0,
               dtype: Any = None, *, temperature: float = 0.7, per_class: int = 16,
               jitter: float = 1.0, like_load_model: bool = True) -> tuple[Model, Model, Any]:
    """(small, large, tokenizer): both models write steps of the law `lengths` when sampled at
    `temperature`, whoever writes a step; weights and jitter differ between them."""
    spec = SHAPES[shape] if isinstance(shape, str) else shape
    dtype = jnp.dtype(dtype or spec.dtype)
    tokenizer = make_tokenizer(len(lengths.weights), per_class)
    small, large = (build_model(cfg, lengths, (seed, i), dtype, temperature=temperature,
                                per_class=per_class, jitter=jitter,
                                like_load_model=like_load_model)
                    for i, cfg in enumerate((spec.small, spec.large)))
    return small, large, tokenizer


# ---- measuring ----------------------------------------------------------------------------------

@functools.lru_cache(maxsize=8)
def _step_ends(tokenizer: Any) -> frozenset[int]:
    ends = {i for i, text in enumerate(token_texts(tokenizer)) if DELIMITER in text}
    return frozenset(ends | {int(tokenizer.eos_token_id)})


def split_steps(tokens: Sequence[int], tokenizer: Any, partial: bool = False) -> list[int]:
    """Step lengths of one generated token list: a step ends at a token containing the delimiter
    or at EOS, and counts that token. A trailing step with no end (cut by the token budget) is
    left out unless `partial`."""
    ends, out, run = _step_ends(tokenizer), [], 0
    for t in tokens:
        run += 1
        if int(t) in ends:
            out.append(run)
            run = 0
    if partial and run:
        out.append(run)
    return out


def summarize(lengths: Sequence[int]) -> dict[str, float]:
    """count, mean, median, p90, p99, max of step lengths."""
    x = np.asarray(lengths, np.float64)
    if not len(x):
        return dict(count=0)
    return dict(count=len(x), mean=float(x.mean()), median=float(np.median(x)),
                p90=float(np.percentile(x, 90)), p99=float(np.percentile(x, 99)),
                max=float(x.max()))


def _one_step(params: dict[str, Any], cache: KVCache, tokens: jax.Array, key: jax.Array, *,
              cfg: ModelConfig) -> tuple[jax.Array, KVCache]:
    length = cache.length
    hidden, cache = forward(params, cfg, tokens[:, None], cache)
    token = jax.random.categorical(key, logits(params, cfg, hidden[:, 0]) / 0.7)
    # The same slot every call: each timed step reads a cache of the same length.
    return token.astype(jnp.int32), dataclasses.replace(cache, length=length)


def decode_step_seconds(model: Model, rows: int, slots: int = 1088, length: int = 528,
                        repeats: int = 3) -> float:
    """Seconds of one decode step (forward, head, sample) of `rows` rows whose caches hold
    `length` of `slots` tokens (1088: what generate gives a 16-token prompt and 1024 new
    tokens): the best of `repeats` runs after the compiling one."""
    cfg = model.config
    cache = KVCache.init(cfg, rows, slots, model.dtype)
    cache = dataclasses.replace(cache, length=jnp.full((rows,), length, jnp.int32))
    cache = execution.loop_cache(cfg, cache)
    step = jax.jit(functools.partial(_one_step, cfg=cfg), donate_argnums=1)
    tokens, key = jnp.full((rows,), CLASS_BASE, jnp.int32), jax.random.key(0)
    best = math.inf
    for i in range(repeats + 1):
        start = time.perf_counter()
        tokens, cache = step(model.params, cache, tokens, key)
        tokens.block_until_ready()
        best = best if i == 0 else min(best, time.perf_counter() - start)
    return best


def main() -> None:
    from steer_jax import generate

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--new", type=int, default=1024)
    ap.add_argument("--rows", default="16,64,256")
    ap.add_argument("--geometric", type=float, help="one geometric class of this mean instead")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    law = StepLengths.geometric(args.geometric) if args.geometric else StepLengths()
    print(f"{law}: median {law.quantile(0.5)}, p90 {law.quantile(0.9)}, p99 "
          f"{law.quantile(0.99)}, P(L > 256) {1 - float(law.cdf(256)):.4f}")
    small, large, tok = build_pair(args.shape, law, args.seed)
    # Each model its own seed: the two chains are the same law on the same token ids, so one
    # seed would make them sample the very same text.
    for seed, name, model in ((args.seed, "small", small), (args.seed + 1, "large", large)):
        print(f"{name}: {model.num_params / 1e6:.2f}M parameters, {model.dtype}")
        for rows in map(int, args.rows.split(",")) if args.rows else ():
            print(f"  decode step, {rows} rows: {1e3 * decode_step_seconds(model, rows):.1f} ms")
        if not args.prompts:
            continue
        start = time.perf_counter()
        out = generate(model, prompts(args.prompts, 16, seed), args.new, temperature=0.7,
                       seed=seed)
        steps = [split_steps(t, tok) for t in out.tokens]
        reasons = {r: out.stop_reasons.count(r) for r in set(out.stop_reasons)}
        print(f"  generate {args.prompts} x {args.new}: {time.perf_counter() - start:.1f} s, "
              f"stops {reasons}, complete steps {json.dumps(summarize(sum(steps, [])))}")


if __name__ == "__main__":
    main()
