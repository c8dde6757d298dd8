"""`steer-jax train-demo`: the embedded demo's small/large model pairs, trained here with optax.

No checkpoint can be downloaded where the demo must run, so the project trains its own pairs on the
`demo` benchmark's training split (steer_jax.eval.demo_task) and ships them under `models/` in the
Hugging Face layout: the demo then goes through the very loading path real checkpoints use.

The pairs are built the way the paper's are: same tokenizer, same family, the large one about 6x
the small one's parameters (two layers of width 64 against six of width 96), trained for the same
steps with the same options. What the small one lacks is knowledge, as a real small model lacks
facts a large one knows: it never sees a problem whose rule multiplies by 6, 7, 8 or 9 (40% of
the training problems; `Shape.unseen`), the large one sees them all. So its weakness is a
property of the problem, not of where a step falls: every step of a problem whose rule needs the
missing facts is hard for it, and every step of the others is easy, which is the structure STEER
routes on (difficulty that differs between problems and persists within one).

Measured, before this design: a 1-layer x 96 small trained on everything (48.8% of the test split)
was weak by position instead (unsure of, say, the second line of every two-operation problem,
right or wrong), so the previous step's confidence said little about the next and STEER routed
~70% of steps; a 2-layer x 64 small trained on everything learned the whole task (100%), leaving
nothing to route.

Training runs the inference forward itself (`transformer.forward` into an empty cache as long as
the batch), so what is trained is exactly what decodes: the loss covers the assistant's tokens
(solution and end of turn), not the prompt. Everything is a pure function of the seed.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from steer_jax.modeling.config import ModelConfig, RopeConfig
from steer_jax.modeling.module import init_params
from steer_jax.modeling.transformer import KVCache, Model, Params, forward, logits

SIZES = ("small", "large")
FAMILIES = ("qwen2", "gemma3")
# Longest training sequence: the longest demo prompt plus the longest worked solution fit in 192.
CONTEXT = 256
# The models' context: RoPE has no table to outgrow, and SpecReason appends its judge prompt (words
# the demo vocabulary spells letter by letter, ~250 tokens) after a whole trace.
MAX_POSITIONS = 512


@dataclasses.dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    mlp: int
    # Operations (operator, operand) this model never sees: training problems whose rule uses one
    # are left out of its draws.
    unseen: tuple[tuple[str, int], ...] = ()


# The large about 6x the small in parameters (the issue asks 4-8x).
SHAPES = {
    "small": Shape(hidden=64, layers=2, heads=4, kv_heads=2, mlp=192,
                   unseen=(("*", 6), ("*", 7), ("*", 8), ("*", 9))),
    "large": Shape(hidden=96, layers=6, heads=6, kv_heads=2, mlp=288),
}


def demo_config(family: str, size: str, tokenizer: Any) -> ModelConfig:
    """The architecture of one demo model: `family` qwen2|gemma3, `size` small|large."""
    if family not in FAMILIES or size not in SIZES:
        raise ValueError(f"unknown demo model {family}/{size}; families {FAMILIES}, sizes {SIZES}")
    s = SHAPES[size]
    head_dim = s.hidden // s.heads
    eos = (int(tokenizer.eos_token_id),)
    common = dict(vocab_size=len(tokenizer), hidden_size=s.hidden, intermediate_size=s.mlp,
                  num_layers=s.layers, num_heads=s.heads, num_kv_heads=s.kv_heads,
                  head_dim=head_dim, rms_norm_eps=1e-6, tie_embeddings=True,
                  max_position_embeddings=MAX_POSITIONS, eos_token_ids=eos,
                  pad_token_id=int(tokenizer.pad_token_id),
                  # As Qwen2.5 has it, <|endoftext|>; nothing prepends it (the template starts
                  # with <|im_start|>), but Gemma's config.json would otherwise default it to 2.
                  bos_token_id=int(tokenizer.pad_token_id))
    if family == "qwen2":
        rope = RopeConfig(10_000.0)
        return ModelConfig(family="qwen2", sliding_layers=(False,) * s.layers, sliding_window=None,
                           rope_global=rope, rope_local=rope, qkv_bias=True, **common)
    # Gemma 3's pattern scaled down: local layers see the last 32 positions (less than a prompt,
    # so the window matters), the last layer is global.
    return ModelConfig(family="gemma3", sliding_layers=tuple(i < s.layers - 1 for i in range(s.layers)),
                       sliding_window=32, rope_global=RopeConfig(1_000_000.0),
                       rope_local=RopeConfig(10_000.0), qk_norm=True, sandwich_norms=True,
                       norm_plus_one=True, embed_scale=True, activation="gelu_tanh",
                       query_pre_attn_scalar=float(head_dim), **common)


@dataclasses.dataclass(frozen=True)
class TrainOptions:
    steps: int = 1500
    batch: int = 32
    lr: float = 3e-3
    warmup: int = 100
    weight_decay: float = 0.01
    seed: int = 0


def encode_examples(tokenizer: Any, examples: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [N, CONTEXT] padded, loss mask [N, CONTEXT]): prompt, then solution and end of turn.

    The mask is set at the positions whose NEXT token is the assistant's, i.e. where the model is
    asked to predict the solution.
    """
    from steer_jax.eval.prompts import render_prompt

    pad, eos = int(tokenizer.pad_token_id), int(tokenizer.eos_token_id)
    tokens = np.full((len(examples), CONTEXT), pad, np.int32)
    mask = np.zeros((len(examples), CONTEXT), np.float32)
    for i, ex in enumerate(examples):
        prompt = tokenizer(render_prompt(tokenizer, ex, "demo"), add_special_tokens=False).input_ids
        answer = tokenizer(ex.meta["solution"], add_special_tokens=False).input_ids + [eos]
        seq = prompt + answer
        if len(seq) > CONTEXT:
            raise ValueError(f"demo example {ex.id} has {len(seq)} tokens, over {CONTEXT}")
        tokens[i, : len(seq)] = seq
        mask[i, len(prompt) - 1 : len(seq) - 1] = 1.0
    return tokens, mask


def draw_weights(examples: Sequence[Any], shape: Shape) -> np.ndarray:
    """How often `train` draws each example for a model of `shape`.

    Each level gets the same total weight (level 1 has few distinct problems, 10 starts x 26
    rules x 5 lengths, and a model that rarely sees one-operation lines gets them wrong); then
    the problems whose rule uses one of the shape's unseen operations get none, so the small
    model draws fewer of the long rules, which more often need one.
    """
    from steer_jax.eval.demo_task import rule_of

    levels = np.array([e.meta["level"] for e in examples])
    counts = {lv: int(np.sum(levels == lv)) for lv in np.unique(levels)}
    unseen = set(shape.unseen)
    return np.array([0.0 if unseen.intersection(rule_of(e.question)) else 1.0 / counts[lv]
                     for e, lv in zip(examples, levels)])


def _loss(params: Params, cfg: ModelConfig, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    cache = KVCache.init(cfg, tokens.shape[0], tokens.shape[1], jnp.float32)
    hidden, _ = forward(params, cfg, tokens, cache)
    logp = jax.nn.log_softmax(logits(params, cfg, hidden[:, :-1]))
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    return jnp.sum(nll * mask[:, :-1]) / jnp.maximum(jnp.sum(mask[:, :-1]), 1.0)


def _optimizer(opts: TrainOptions) -> optax.GradientTransformation:
    warmup = min(opts.warmup, opts.steps // 10)
    schedule = optax.warmup_cosine_decay_schedule(0.0, opts.lr, warmup, max(opts.steps, warmup + 1),
                                                  end_value=opts.lr * 0.05)
    return optax.chain(optax.clip_by_global_norm(1.0),
                       optax.adamw(schedule, b2=0.98, weight_decay=opts.weight_decay))


@functools.partial(jax.jit, static_argnames=("cfg", "opts"), donate_argnums=(0, 1))
def _step(params: Params, opt_state: Any, tokens: jax.Array, mask: jax.Array, *,
          cfg: ModelConfig, opts: TrainOptions) -> tuple[Params, Any, jax.Array]:
    # Module level, keyed by (cfg, opts): every train() call with the same ones shares its compiles.
    loss, grads = jax.value_and_grad(_loss)(params, cfg, tokens, mask)
    updates, opt_state = _optimizer(opts).update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def train(cfg: ModelConfig, tokens: np.ndarray, mask: np.ndarray, opts: TrainOptions,
          log: Callable[[int, float], None] | None = None,
          weights: np.ndarray | None = None) -> Params:
    """Train from a seeded init on seeded batches; returns the parameters.

    `weights`: how often each example is drawn (normalized here); None draws by permutation.
    """
    params = init_params(cfg, jax.random.key(opts.seed))
    opt_state = _optimizer(opts).init(params)
    p = None if weights is None else np.asarray(weights, np.float64) / np.sum(weights)
    rng = np.random.default_rng(opts.seed)
    order = np.empty(0, np.int64)
    lengths = (mask > 0).argmax(1) + mask.sum(1).astype(np.int64) + 1
    for i in range(opts.steps):
        if p is not None:
            idx = rng.choice(len(tokens), size=opts.batch, replace=False, p=p)
        else:
            if len(order) < opts.batch:
                order = np.concatenate([order, rng.permutation(len(tokens))])
            idx, order = order[: opts.batch], order[opts.batch:]
        # Pad each batch to a multiple of 32 of its longest row: a handful of compiled widths.
        width = int(min(CONTEXT, -(-int(lengths[idx].max()) // 32) * 32))
        params, opt_state, loss = _step(params, opt_state, tokens[idx, :width], mask[idx, :width],
                                        cfg=cfg, opts=opts)
        if log is not None and (i % 50 == 0 or i == opts.steps - 1):
            log(i, float(loss))
    return params


def train_pair(family: str, out: str | Path, opts: TrainOptions = TrainOptions(),
               log: Callable[[str], None] = print,
               sizes: Sequence[str] = SIZES) -> dict[str, Any]:
    """Train `family`'s demo models of `sizes` and save them under out/demo-<family>-<size>.

    Returns the record written to out/demo-<family>.json: sizes, parameter counts, final losses,
    seconds taken, and the options. Retraining one size keeps the other's entry when it was
    trained with the same options (the sizes train independently).
    """
    unknown = sorted(set(sizes) - set(SIZES))
    if unknown or not sizes:
        raise ValueError(f"sizes must be among {SIZES}, got {list(sizes)}")
    from steer_jax.eval import demo_task
    from steer_jax.modeling.export import save_hf

    tokenizer = demo_task.build_demo_tokenizer()
    examples = demo_task.make_split("train")
    tokens, mask = encode_examples(tokenizer, examples)
    record: dict[str, Any] = {"family": family, "options": dataclasses.asdict(opts), "models": {}}
    record_path = Path(out, f"demo-{family}.json")
    if record_path.exists():
        old = json.loads(record_path.read_text())
        if old.get("options") == record["options"]:
            record["models"] = {k: v for k, v in old.get("models", {}).items() if k not in sizes}
    for size in [s for s in ("large", "small") if s in sizes]:  # large first: its loss is the
        # first sign a run is sound
        cfg = demo_config(family, size, tokenizer)
        losses: list[float] = []
        start = time.perf_counter()

        def progress(i: int, loss: float, size: str = size) -> None:
            losses.append(loss)
            log(f"{family} {size}: step {i + 1}/{opts.steps} loss {loss:.4f} "
                f"({time.perf_counter() - start:.0f}s)")

        params = train(cfg, tokens, mask, opts, progress, draw_weights(examples, SHAPES[size]))
        model = Model(cfg, jax.device_get(params))
        path = save_hf(model, Path(out) / f"demo-{family}-{size}", tokenizer=tokenizer,
                       dtype="float32")
        record["models"][size] = {"path": str(path), "params": model.num_params,
                                  "final_loss": losses[-1], "losses_every_50": losses,
                                  "seconds": round(time.perf_counter() - start, 1)}
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    return record
