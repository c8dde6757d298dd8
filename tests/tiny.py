"""Tiny random HF checkpoints that transformers builds and saves: the independent reference.
Also the environment and the outputs of the tests' JAX subprocesses."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import jax
import torch
import transformers as tf

VOCAB = 128


def _randomize_norms(model: torch.nn.Module, seed: int) -> None:
    # HF initializes norms to 1 (Qwen2) or 0 (Gemma's 1 + w); random values make a slip in the
    # norm formula show in the logits.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5 + (0.0 if "gemma" in
                        model.config.model_type else 1.0))


def qwen2_config(*, tied: bool, gqa: bool, layers: int = 2, hidden: int = 64,
                 intermediate: int = 96, heads: int = 4, context: int = 512) -> tf.Qwen2Config:
    return tf.Qwen2Config(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=heads // 2 if gqa else heads, tie_word_embeddings=tied,
        rope_theta=10000.0, max_position_embeddings=context, eos_token_id=2, bos_token_id=1)


def gemma3_text_config(**overrides) -> tf.Gemma3TextConfig:
    kw = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24,
        sliding_window=4, layer_types=["sliding_attention", "sliding_attention", "full_attention",
                                       "sliding_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0,
                                            "rope_theta": 100000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0}},
        max_position_embeddings=512, eos_token_id=2, bos_token_id=1, pad_token_id=0)
    kw.update(overrides)
    return tf.Gemma3TextConfig(**kw)


def save(model: torch.nn.Module, path: Path, seed: int, **save_kw) -> Path:
    _randomize_norms(model, seed)
    model.eval()
    model.save_pretrained(path, **save_kw)
    return path


def qwen2(path: Path, *, tied: bool, gqa: bool, seed: int = 0, **kw) -> tf.Qwen2ForCausalLM:
    torch.manual_seed(seed)
    model = tf.Qwen2ForCausalLM(qwen2_config(tied=tied, gqa=gqa, **kw))
    save(model, path, seed)
    return model


def gemma3_text(path: Path, seed: int = 0, **kw) -> tf.Gemma3ForCausalLM:
    torch.manual_seed(seed)
    model = tf.Gemma3ForCausalLM(gemma3_text_config(**kw))
    save(model, path, seed)
    return model


def gemma3_multimodal(path: Path, seed: int = 0) -> tf.Gemma3ForConditionalGeneration:
    torch.manual_seed(seed)
    vision = tf.SiglipVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                   num_attention_heads=2, image_size=28, patch_size=14)
    cfg = tf.Gemma3Config(text_config=gemma3_text_config().to_dict(),
                          vision_config=vision.to_dict(), mm_tokens_per_image=4,
                          image_token_index=VOCAB - 1, boi_token_index=VOCAB - 3,
                          eoi_token_index=VOCAB - 2)
    model = tf.Gemma3ForConditionalGeneration(cfg)
    save(model, path, seed, max_shard_size="40KB")
    return model


def tokenizer(texts: list[str]) -> tf.PreTrainedTokenizerFast:
    """A real HF tokenizer whose token i decodes to texts[i] (a word-level vocabulary)."""
    from tokenizers import Tokenizer, models

    vocab = {t: i for i, t in enumerate(texts)}
    assert len(vocab) == len(texts), "token texts must be distinct"
    tok = Tokenizer(models.WordLevel(vocab, unk_token=texts[0]))
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=texts[0])


def plain_texts(n: int = VOCAB) -> list[str]:
    """Distinct token texts with no newline, digit or operator: nothing ends a step by default."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    return [letters[i // 26 % 26] + letters[i % 26] + "q" for i in range(n)]


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def chat_tokenizer() -> tf.PreTrainedTokenizerFast:
    """A character-level ChatML tokenizer over VOCAB ids: any text encodes, and ten multi-char
    tokens end a step ("\\n\\n"). Id 2 is <|im_end|>, the tiny models' EOS."""
    import string

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    chars = [c for c in string.printable if c not in "\x0b\x0c\r"]
    steps = [f"{w}\n\n" for w in ("so", "then", "thus", "next", "hence", "now", "and", "ok")]
    texts = specials + chars + steps
    texts += [f"<filler{i}>" for i in range(VOCAB - len(texts))]
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(texts)}, unk_token="?"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    hf = tf.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                    pad_token="<|endoftext|>", chat_template=CHATML)
    hf.add_special_tokens({"additional_special_tokens": specials[1:2]})
    return hf


# Eight chat questions: one trace per 'data' device of the 8 fake CPU devices.
QUESTIONS = ["What is 2+2?", "Add 17 and 5.", "Is 9 prime?", "Name a color.", "Sum 1..4",
             "x=3, y=4, x*y?", "Spell cat.", "Why?"]


def chat_prompts(tok, questions: list[str] = QUESTIONS) -> list[list[int]]:
    """Token ids of each question as a user turn, through the tokenizer's chat template."""
    return [tok(tok.apply_chat_template([{"role": "user", "content": q}],
                                        add_generation_prompt=True, tokenize=False),
                add_special_tokens=False)["input_ids"] for q in questions]


def steer_pair(root: Path, family: str = "qwen2") -> tuple[Path, Path]:
    """A small (2 layers) and a large (3 layers, wider) Qwen2 checkpoint with one tokenizer;
    with family="gemma3", two Gemma 3 models (window 4) of 4 and 6 layers, sliding and global
    layers mixed as the real ones are."""
    small = root / "small"
    large = root / "large"
    if family == "gemma3":
        kinds = ["sliding_attention"] * 2 + ["full_attention"]
        gemma3_text(small, seed=11, max_position_embeddings=1024, layer_types=kinds + kinds[:1],
                    num_hidden_layers=4)
        gemma3_text(large, seed=12, max_position_embeddings=1024, layer_types=kinds * 2,
                    num_hidden_layers=6, hidden_size=96, intermediate_size=160)
    else:
        qwen2(small, tied=True, gqa=True, seed=11, layers=2, context=1024)
        qwen2(large, tied=False, gqa=True, seed=12, layers=3, hidden=96, intermediate=160,
              context=1024)
    tok = chat_tokenizer()
    for path in (small, large):
        tok.save_pretrained(path)
    return small, large


# Short traces on the tiny pair: four rounds of at most 12 tokens, 40 in all.
SHORT = dict(max_steps=4, max_step_tokens=12, max_new_tokens=40, temperature=0.7, seed=1)


def run(pair: dict, **kw):
    """STEER on the `pair` fixture's models and prompts, SHORT unless `kw` says otherwise."""
    from steer_jax import steer

    return steer(pair["small"], pair["large"], pair["tok"], pair["prompts"], **{**SHORT, **kw})


def copied(state):
    """A RoundState a hook is shown, with copies of the arrays the next call donates."""
    import dataclasses

    return dataclasses.replace(state, trace=jax.tree.map(lambda x: x.copy(), state.trace),
                               caches=jax.tree.map(lambda x: x.copy(), state.caches))


def prm(path: Path, seed: int = 13) -> tuple[tf.Qwen2ForCausalLM, torch.Tensor, torch.Tensor]:
    """A Qwen2 process reward model in the Skywork-o1-Open-PRM layout: the causal LM's tensors
    plus `v_head.summary.{weight,bias}`. Returns the torch model and the head's weight and bias."""
    from safetensors.torch import load_file, save_file

    model = qwen2(path, tied=True, gqa=True, seed=seed, layers=2, context=1024)
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(1, model.config.hidden_size, generator=g) * 0.3
    b = torch.randn(1, generator=g)
    tensors = load_file(path / "model.safetensors")
    tensors.update({"v_head.summary.weight": w, "v_head.summary.bias": b})
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    chat_tokenizer().save_pretrained(path)
    return model, w[0], b


def cpu_process_env(devices: int) -> dict[str, str]:
    """The environment of a JAX subprocess on `devices` fake CPU devices, with this process's
    other XLA flags: a test that compares a subprocess's floats with its own needs both compiled
    alike (see conftest.py)."""
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                   os.environ.get("XLA_FLAGS", ""))
    return {**os.environ, "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={devices}".strip()}


def outputs(procs: list[subprocess.Popen], timeout: float) -> list[str]:
    """Each process's output once all have ended. On a timeout every process is killed (a hung
    one would otherwise spin on through the files after it) and the error shows what each had
    printed, not only the first one's."""
    try:
        return [p.communicate(timeout=timeout)[0] for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        printed = [p.communicate()[0] for p in procs]
        raise AssertionError(f"processes still running after {timeout} s; they printed "
                             f"{printed}") from None


def dot_precisions(jaxpr) -> list:
    """Each dot_general's precision in a jaxpr, nested calls (jit, scan) included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append(eqn.params["precision"])
        for v in eqn.params.values():
            inner = getattr(v, "jaxpr", v)
            if hasattr(inner, "eqns"):
                found += dot_precisions(inner)
    return found


def is_highest(precision) -> bool:
    """Whether a dot_general's precision asks for full float32 (one value or one per operand)."""
    highest = jax.lax.Precision.HIGHEST
    return precision in (highest, (highest, highest))
