"""make-tiny-model, the HF config parser and the checkpoint loader."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from infergrid.worker.cli import main as cli_main
from infergrid.worker.layers.attention_backends import get_attention_backend
from infergrid.worker.loader import load_model, resolve_model_path, safetensors_files
from infergrid.worker.model_config import ModelConfig
from infergrid.worker.tokenizer import load_tokenizer


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_cli_writes_a_deterministic_checkpoint(tmp_path, tiny_model):
    assert cli_main(["make-tiny-model", str(tmp_path / "a"), "--arch", "qwen3"]) == 0
    assert cli_main(["make-tiny-model", str(tmp_path / "b"), "--arch", "qwen3", "--seed", "5"]) == 0
    reference = Path(tiny_model("qwen3"))  # same arch, seed 0, made by the fixture
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"):
        assert digest(tmp_path / "a" / name) == digest(reference / name), name
    assert digest(tmp_path / "b" / "model.safetensors") != digest(reference / "model.safetensors")


@pytest.mark.parametrize("name", ["llama", "qwen2", "qwen3", "llama_untied", "llama3_rope"])
def test_tiny_checkpoints_parse_and_load(tiny_model, name):
    path = tiny_model(name)
    cfg = ModelConfig.from_pretrained(path)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (64, 2, 4, 2)
    assert cfg.qkv_bias == (name == "qwen2") and cfg.qk_norm == (name == "qwen3")
    assert cfg.tie_word_embeddings == (name != "llama_untied")
    assert (cfg.rope_scaling or {}).get("rope_type") == ("llama3" if name == "llama3_rope" else None)
    model = load_model(path, cfg, torch.float32, torch.device("cpu"), 64, get_attention_backend(torch.device("cpu")))
    if cfg.tie_word_embeddings:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    else:
        assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)


def test_tokenizer_has_specials_and_a_chat_template(tiny_llama):
    tok = load_tokenizer(tiny_llama)
    assert 256 < len(tok) <= 512
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
    assert tok("hello")["input_ids"][0] == tok.bos_token_id
    assert tok.decode(tok("Hello world!", add_special_tokens=False)["input_ids"]) == "Hello world!"
    assert "add_generation_prompt" in tok.chat_template


@pytest.mark.parametrize("chat_format", ["llama3", "qwen2.5"])
def test_chat_formats_render_tools_with_their_family_tokens(tmp_path, chat_format):
    from infergrid.worker.tokenizer import eos_token_ids

    out = tmp_path / chat_format
    assert cli_main(["make-tiny-model", str(out), "--arch", "qwen2", "--chat-format", chat_format]) == 0
    tok = load_tokenizer(str(out))
    vocab_size = ModelConfig.from_pretrained(str(out)).vocab_size
    family = ["<|start_header_id|>", "<|eot_id|>", "<|python_tag|>"] if chat_format == "llama3" else [
        "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>"]
    assert all(384 <= tok.convert_tokens_to_ids(t) < vocab_size for t in family)  # (new ids, in the model)
    messages = [{"role": "user", "content": "hi"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "f", "arguments": {"x": 1}}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "42"}]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    text = tok.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    end_of_turn = "<|eot_id|>" if chat_format == "llama3" else "<|im_end|>"
    assert tok.convert_tokens_to_ids(end_of_turn) in ids and tok.convert_tokens_to_ids(end_of_turn) in eos_token_ids(
        str(out), tok)
    if chat_format == "llama3":
        assert '{"name": "f", "parameters": {"x": 1}}' in text and text.endswith("assistant<|end_header_id|>\n\n")
    else:
        call = tok.convert_tokens_to_ids("<tool_call>")
        assert call in ids and tok.decode([call], skip_special_tokens=True) == "<tool_call>"  # (not special)
        assert '{"name": "f", "arguments": {"x": 1}}' in text and "<tool_response>\n42" in text
    assert '"name": "f"' in text.split(end_of_turn)[0]  # the tools are described up front


def test_sharded_checkpoint_loads_identically(tmp_path, tiny_llama):
    from transformers import AutoModelForCausalLM

    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(tiny_llama).save_pretrained(sharded, max_shard_size="40KB")
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (sharded / f).write_bytes((Path(tiny_llama) / f).read_bytes())
    files = safetensors_files(str(sharded))
    assert len(files) > 1 and (sharded / "model.safetensors.index.json").exists()
    cfg = ModelConfig.from_pretrained(tiny_llama)
    backend = get_attention_backend(torch.device("cpu"))
    a = load_model(tiny_llama, cfg, torch.float32, torch.device("cpu"), 64, backend)
    b = load_model(str(sharded), cfg, torch.float32, torch.device("cpu"), 64, backend)
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(pa, pb), name


def test_missing_weights_are_reported(tmp_path, tiny_model):
    from safetensors.torch import load_file, save_file

    src = Path(tiny_model("qwen2"))
    dst = tmp_path / "broken"
    dst.mkdir()
    (dst / "config.json").write_bytes((src / "config.json").read_bytes())
    tensors = load_file(src / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, dst / "model.safetensors")
    cfg = ModelConfig.from_pretrained(str(dst))
    with pytest.raises(ValueError, match="down_proj"):
        load_model(str(dst), cfg, torch.float32, torch.device("cpu"), 64, get_attention_backend(torch.device("cpu")))


def test_old_style_config_fields():
    cfg = ModelConfig.from_dict({
        "architectures": ["MistralForCausalLM"], "vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 1,
        "rope_theta": 500000.0, "torch_dtype": "bfloat16", "sliding_window": 4096, "eos_token_id": [1, 7],
        "rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192},
    })
    assert cfg.rope_theta == 500000.0 and cfg.torch_dtype == torch.bfloat16
    assert cfg.rope_scaling["rope_type"] == "llama3" and cfg.sliding_window == 4096
    assert cfg.eos_token_ids == (1, 7) and cfg.head_dim == 16
    with pytest.raises(ValueError, match="unsupported architectures"):
        ModelConfig.from_dict({"architectures": ["GPT2LMHeadModel"]})


def test_model_sources(tmp_path, tiny_llama):
    assert resolve_model_path(f"file://{tiny_llama}") == tiny_llama
    with pytest.raises(ValueError, match="not a directory"):
        resolve_model_path(str(tmp_path / "nope"))
    cfg = json.loads((Path(tiny_llama) / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
