"""Tiny random checkpoints for tests and demos, made offline and deterministically.

`make_tiny_model(out, arch)` trains a small byte-level BPE tokenizer on built-in English text,
builds the architecture's transformers config, initialises the model from a fixed seed and writes a
normal Hugging Face directory (config.json, model.safetensors, tokenizer.json, tokenizer_config.json
with a chat template, generation_config.json). Nothing is downloaded.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

ARCHS = ("llama", "qwen2", "qwen3", "mistral")

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
SPECIAL_TOKENS = [BOS, EOS, PAD, *ROLE_TOKENS]

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' }}\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}\n{% endif %}"
)

# Chat formats a tiny model can carry (`chat_format`): "default" above, or the special tokens and a
# (shortened, written here) chat template with tool calling in the Llama 3.x or Qwen2.5 style, so that
# the server's tool-call parsers and templates can be tested without downloading a checkpoint.
CHAT_FORMATS = ("default", "llama3", "qwen2.5")

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                   "<|eom_id|>", "<|python_tag|>"]
LLAMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}<|start_header_id|>system<|end_header_id|>\n\n"
    "To call a function, answer with JSON {\"name\": function name, \"parameters\": arguments}.\n"
    "{% for t in tools %}\n{{ t | tojson }}{% endfor %}<|eot_id|>{% endif %}"
    "{% for message in messages %}"
    "{% if message.role == 'assistant' and message.tool_calls %}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
    "{% for tc in message.tool_calls %}{{ '{\"name\": \"' + tc.function.name + '\", \"parameters\": ' }}"
    "{{ tc.function.arguments | tojson }}{{ '}' }}{% endfor %}<|eot_id|>"
    "{% elif message.role == 'tool' %}<|start_header_id|>ipython<|end_header_id|>\n\n"
    "{{ message.content }}<|eot_id|>"
    "{% else %}<|start_header_id|>{{ message.role }}<|end_header_id|>\n\n{{ message.content }}<|eot_id|>"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
QWEN_SPECIALS = ["<|im_start|>", "<|im_end|>"]
QWEN_TOOL_TOKENS = ["<tool_call>", "</tool_call>"]  # (added but not special: they stay in the text)
QWEN_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nYou may call functions:\n<tools>"
    "{% for t in tools %}\n{{ t | tojson }}{% endfor %}\n</tools>\n"
    "For each call answer <tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n"
    "</tool_call><|im_end|>\n{% endif %}"
    "{% for message in messages %}"
    "{% if message.role == 'assistant' %}<|im_start|>assistant\n{{ message.content or '' }}"
    "{% for tc in message.tool_calls or [] %}<tool_call>\n{\"name\": \"{{ tc.function.name }}\", "
    "\"arguments\": {{ tc.function.arguments | tojson }}}\n</tool_call>{% endfor %}<|im_end|>\n"
    "{% elif message.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ message.content }}\n"
    "</tool_response><|im_end|>\n"
    "{% else %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Training text for the tokenizer: plain English, written for this project.
CORPUS = """\
The quick brown fox jumps over the lazy dog. A small model can still say a few words.
Once upon a time there was a little town by the river, and the people of the town liked to tell stories.
Every morning the baker opened the shop, the children walked to school, and the old man fed the birds.
What is the capital of France? Paris is the capital of France. What is two plus two? Two plus two is four.
Hello, how are you today? I am fine, thank you. It is a good day to learn something new.
The weather was cold in the winter and warm in the summer. In the spring the trees were green again.
She opened the window and looked at the stars. There were many of them, bright and far away.
Computers read numbers, and numbers can stand for letters, sounds and pictures.
A language model reads a sequence of tokens and predicts the next token, one step at a time.
The server answers requests from many users at once, and it must be fast and fair to all of them.
We write tests so that we know the program works, and we run them every time we change the code.
Please write a short poem about the sea. The sea is blue, the sea is wide, it moves with every tide.
Tell me a story about a cat. The cat sat on the mat and waited for the rain to stop.
Numbers: one, two, three, four, five, six, seven, eight, nine, ten, eleven, twelve.
Days: Monday, Tuesday, Wednesday, Thursday, Friday, Saturday, Sunday. Months have names too.
If you want to go far, go together. If you want to go fast, go alone. Both can be true.
The engineer measured the time it took, wrote down the number, and compared it with the old one.
Water boils at one hundred degrees and freezes at zero. Ice is lighter than water, so it floats.
A good question is half of the answer. Ask, listen, and think before you speak.
The end of the story is not the end of the book; there is always another page to read.
"""


def train_tokenizer(vocab_size: int = 384) -> Any:
    """A byte-level BPE `tokenizers.Tokenizer` with BOS prepended on encode."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    return tok


def _add_chat_format_tokens(tok: Any, chat_format: str) -> tuple[list[str], list[str], str, list[str]]:
    """Add the format's tokens to `tok`; returns (special tokens, other added tokens, chat template,
    extra end-of-turn tokens for generation_config's eos_token_id)."""
    from tokenizers import AddedToken

    if chat_format == "default":
        return [], [], CHAT_TEMPLATE, []
    if chat_format == "llama3":
        tok.add_special_tokens(LLAMA3_SPECIALS)
        return LLAMA3_SPECIALS, [], LLAMA3_TEMPLATE, ["<|eot_id|>", "<|eom_id|>"]
    if chat_format == "qwen2.5":
        tok.add_special_tokens(QWEN_SPECIALS)
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in QWEN_TOOL_TOKENS])
        return QWEN_SPECIALS, QWEN_TOOL_TOKENS, QWEN_TEMPLATE, ["<|im_end|>"]
    raise ValueError(f"chat_format must be one of {', '.join(CHAT_FORMATS)}, got {chat_format!r}")


def _write_tokenizer(out: str, tok: Any, chat_format: str = "default") -> tuple[dict[str, int], list[int]]:
    specials, others, template, end_of_turn = _add_chat_format_tokens(tok, chat_format)
    tok.save(os.path.join(out, "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    added = {
        str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                  "single_word": False, "special": t not in others}
        for t in [*SPECIAL_TOKENS, *specials, *others]
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 2048,
        "added_tokens_decoder": added,
        "chat_template": template,
    }
    with open(os.path.join(out, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(out, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump({"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}, f, indent=2)
    return ids, [tok.token_to_id(t) for t in end_of_turn]


def build_config(
    arch: str,
    vocab_size: int,
    ids: dict[str, int],
    *,
    tie_word_embeddings: bool = True,
    rope_scaling: str | None = None,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    max_position_embeddings: int = 1024,
    initializer_range: float = 0.1,
) -> Any:
    """The transformers config object for one tiny architecture."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-6,
        bos_token_id=ids[BOS],
        eos_token_id=ids[EOS],
        pad_token_id=ids[PAD],
        tie_word_embeddings=tie_word_embeddings,
        initializer_range=initializer_range,
        rope_theta=10000.0,
    )
    if rope_scaling == "llama3":
        common["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        }
    elif rope_scaling is not None:
        raise ValueError(f"rope_scaling must be None or 'llama3', got {rope_scaling!r}")
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "mistral":
        return MistralConfig(**common, sliding_window=None)
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "qwen3":
        return Qwen3Config(**common, head_dim=hidden_size // num_heads)
    raise ValueError(f"arch must be one of {', '.join(ARCHS)}, got {arch!r}")


def make_tiny_model(
    out: str,
    arch: str = "llama",
    seed: int = 0,
    *,
    tie_word_embeddings: bool = True,
    rope_scaling: str | None = None,
    vocab_size: int = 384,
    chat_format: str = "default",
) -> str:
    """Write a tiny random `arch` checkpoint with tokenizer and chat template to `out`; returns `out`.
    `chat_format` (CHAT_FORMATS): the tokenizer's chat template and its special tokens; "llama3" and
    "qwen2.5" render tools and tool calls like those families (their tokens join the vocabulary)."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {', '.join(ARCHS)}, got {arch!r}")
    os.makedirs(out, exist_ok=True)
    tok = train_tokenizer(vocab_size)
    if chat_format not in CHAT_FORMATS:
        raise ValueError(f"chat_format must be one of {', '.join(CHAT_FORMATS)}, got {chat_format!r}")
    ids, end_of_turn = _write_tokenizer(out, tok, chat_format)
    config = build_config(
        arch, tok.get_vocab_size(), ids, tie_word_embeddings=tie_word_embeddings, rope_scaling=rope_scaling
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=ids[BOS], eos_token_id=[ids[EOS], *end_of_turn] if end_of_turn else ids[EOS],
        pad_token_id=ids[PAD], do_sample=False
    )
    model.save_pretrained(out)
    return out
