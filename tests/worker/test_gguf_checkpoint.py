"""GGUF model sources: the conversion equals transformers' own GGUF loader tensor for tensor, a .gguf
file (or a directory holding one) is a model source, the demo model is checked and made once, and
what cannot be read is refused with the problem named."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from infergrid.worker import LLM, SamplingParams
from infergrid.worker.cli import main as worker_cli
from infergrid.worker.demo_model import DEMO_GGUF_SHA256, demo_gguf_path, make_demo_model
from infergrid.worker.gguf_checkpoint import GGUFError, find_gguf_file, gguf_model_dir, is_converted
from infergrid.worker.loader import resolve_model_path
from infergrid.worker.model_config import ModelConfig


def write_gguf(path: Path, arch: str, tensors: dict[str, tuple[np.ndarray, object]], tokenizer: bool = True) -> Path:
    """A minimal GGUF file: a Llama-shaped header for `arch` (naming a tokenizer model, without its
    vocabulary) and the given (data, raw type) tensors."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(128)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_context_length(128)
    writer.add_vocab_size(32)
    if tokenizer:
        writer.add_tokenizer_model("gpt2")
    for name, (data, raw_dtype) in tensors.items():
        writer.add_tensor(name, data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.slow
def test_conversion_equals_the_transformers_gguf_loader(smollm2: str) -> None:
    from transformers import AutoModelForCausalLM

    gguf_file = demo_gguf_path()
    reference = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf_file), dtype=torch.float32,
                                                     gguf_file=os.path.basename(gguf_file)).state_dict()
    ours = load_file(os.path.join(smollm2, "model.safetensors"))
    assert set(reference) - set(ours) == {"lm_head.weight"}  # tied: not stored
    assert torch.equal(reference["lm_head.weight"], ours["model.embed_tokens.weight"])
    different = [name for name, tensor in ours.items() if not torch.equal(tensor, reference[name])]
    assert different == []
    config = json.loads(Path(smollm2, "config.json").read_text())
    assert (config["architectures"], config["num_hidden_layers"], config["num_attention_heads"],
            config["num_key_value_heads"], config["vocab_size"]) == (["LlamaForCausalLM"], 30, 9, 3, 49152)
    assert "<|im_start|>" in json.loads(Path(smollm2, "tokenizer_config.json").read_text())["chat_template"]


def test_the_demo_model_is_made_once_and_checked(smollm2: str, tmp_path: Path, capsys) -> None:
    assert is_converted(smollm2, DEMO_GGUF_SHA256)
    before = os.stat(os.path.join(smollm2, "model.safetensors")).st_mtime_ns
    assert worker_cli(["make-demo-model", smollm2]) == 0  # already there: nothing rewritten
    assert capsys.readouterr().out.strip() == smollm2
    assert os.stat(os.path.join(smollm2, "model.safetensors")).st_mtime_ns == before

    occupied = tmp_path / "my-models"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="exists and is not a GGUF conversion of ours"):
        make_demo_model(str(occupied))
    assert (occupied / "notes.txt").read_text() == "mine"

    fake = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    fake.write_bytes(b"GGUF not really")
    with pytest.raises(ValueError, match=f"has sha256 [0-9a-f]{{64}}, expected {DEMO_GGUF_SHA256}"):
        make_demo_model(str(tmp_path / "out"), gguf_path=str(fake))
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_gguf_file_or_directory_is_a_model_source(smollm2: str, tmp_path: Path) -> None:
    """Converted once into the model cache (a second resolve reuses it), then served like any checkpoint."""
    cache = tmp_path / "cache"
    holder = tmp_path / "holder"
    holder.mkdir()
    gguf_file = holder / "smollm2.gguf"
    os.symlink(demo_gguf_path(), gguf_file)
    assert find_gguf_file(str(holder)) == str(gguf_file)
    converted = resolve_model_path(f"file://{holder}", cache_dir=str(cache))
    assert converted == resolve_model_path(str(gguf_file), cache_dir=str(cache))
    assert converted.startswith(str(cache / "gguf" / "smollm2-"))
    llm = LLM(f"file://{gguf_file}", dtype="float32", max_model_len=256, model_cache_dir=str(cache))
    answer = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                      SamplingParams(temperature=0, max_tokens=12))[0].outputs[0].text
    assert "Paris" in answer


def test_unreadable_sources_are_refused_with_the_problem_named(tmp_path: Path) -> None:
    import gguf

    f32 = gguf.GGMLQuantizationType.F32
    gpt2 = write_gguf(tmp_path / "gpt2.gguf", "gpt2", {"token_embd.weight": (np.zeros((32, 64), np.float32), f32)})
    with pytest.raises(GGUFError, match="GGUF architecture 'gpt2' is not supported; supported: llama, qwen2, qwen3"):
        gguf_model_dir(str(gpt2), str(tmp_path / "cache"))

    q8_1 = gguf.GGMLQuantizationType.Q8_1
    block_count, block_bytes = 32 * 64 // 32, gguf.GGML_QUANT_SIZES[q8_1][1]
    raw = np.zeros((32, 64 // 32 * block_bytes), np.uint8)
    assert raw.size == block_count * block_bytes
    quant = write_gguf(tmp_path / "q81.gguf", "llama", {"token_embd.weight": (raw, q8_1)})
    with pytest.raises(GGUFError, match="GGUF tensor 'token_embd.weight' uses quantization type Q8_1, which the "
                                        "gguf package cannot dequantize"):
        gguf_model_dir(str(quant), str(tmp_path / "cache"))
    assert not list((tmp_path / "cache" / "gguf").glob("q81-*/config.json"))  # nothing half-written kept

    odd = write_gguf(tmp_path / "odd.gguf", "llama", {"blk.0.attn_qkv.weight": (np.zeros((8, 64), np.float32), f32)})
    with pytest.raises(GGUFError, match="GGUF tensor 'blk.0.attn_qkv.weight' has no counterpart"):
        gguf_model_dir(str(odd), str(tmp_path / "cache"))

    bare = write_gguf(tmp_path / "bare.gguf", "llama", {"output_norm.weight": (np.ones(64, np.float32), f32)},
                      tokenizer=False)
    with pytest.raises(GGUFError, match="carries no tokenizer"):
        gguf_model_dir(str(bare), str(tmp_path / "cache"))

    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all")
    with pytest.raises(GGUFError, match="is not a readable GGUF file"):
        resolve_model_path(str(junk))

    two = tmp_path / "two"
    two.mkdir()
    for name in ("a.gguf", "b.gguf"):
        shutil.copy(junk, two / name)
    with pytest.raises(ValueError, match=r"holds several GGUF files \(a.gguf, b.gguf\): name one of them"):
        resolve_model_path(str(two))
    with pytest.raises(ValueError, match="is a file but not a .gguf file"):
        resolve_model_path(__file__)


def llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to Llama Q/K rows (its rotary layout)."""
    return weight.reshape(num_heads, 2, weight.shape[0] // num_heads // 2, *weight.shape[1:]).swapaxes(1, 2) \
        .reshape(weight.shape)


@pytest.mark.parametrize(("name", "gguf_arch"), [("llama_untied", "llama"), ("qwen2", "qwen2"), ("qwen3", "qwen3")])
def test_tiny_checkpoints_written_as_gguf_read_back_exactly(tiny_model, tmp_path: Path, name: str,
                                                            gguf_arch: str) -> None:
    """Names, biases, Q/K norms, untied heads and (Llama only) the Q/K row permutation, on shapes other
    than the demo model's: a tiny checkpoint written the way llama.cpp's converter would, read back."""
    import gguf

    from infergrid.worker.gguf_checkpoint import gguf_config, gguf_weights

    path = tiny_model(name)
    hf = json.loads(Path(path, "config.json").read_text())
    weights = {k: v.numpy() for k, v in load_file(os.path.join(path, "model.safetensors")).items()}
    to_gguf = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
               "lm_head.weight": "output.weight"}
    layer_parts = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                   "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
                   "self_attn.k_norm": "attn_k_norm", "post_attention_layernorm": "ffn_norm",
                   "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    writer = gguf.GGUFWriter(str(tmp_path / "m.gguf"), gguf_arch)
    writer.add_block_count(hf["num_hidden_layers"])
    writer.add_embedding_length(hf["hidden_size"])
    writer.add_feed_forward_length(hf["intermediate_size"])
    writer.add_head_count(hf["num_attention_heads"])
    writer.add_head_count_kv(hf["num_key_value_heads"])
    writer.add_key_length(hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"])
    writer.add_context_length(hf["max_position_embeddings"])
    writer.add_vocab_size(hf["vocab_size"])
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(hf["rms_norm_eps"])
    for hf_name, value in weights.items():
        if hf_name in to_gguf:
            gguf_name = to_gguf[hf_name]
        else:
            _, _, layer, rest = hf_name.split(".", 3)
            part, kind = rest.rsplit(".", 1)
            gguf_name = f"blk.{layer}.{layer_parts[part]}.{kind}"
        if gguf_arch == "llama" and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = hf["num_attention_heads" if "q_proj" in hf_name else "num_key_value_heads"]
            value = llama_cpp_permute(value, heads)
        writer.add_tensor(gguf_name, np.ascontiguousarray(value))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    config = gguf_config(reader)
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "tie_word_embeddings", "architectures"):
        assert config[key] == hf[key], key
    read = dict(gguf_weights(reader, config))
    assert set(read) == set(weights)
    assert [k for k, v in read.items() if not np.array_equal(v.numpy(), weights[k])] == []
    ours = ModelConfig.from_dict(config)  # what the engine reads back matches the original checkpoint's
    original = ModelConfig.from_pretrained(path)
    for key in ("head_dim", "qkv_bias", "qk_norm", "tie_word_embeddings", "rms_norm_eps", "rope_theta"):
        assert getattr(ours, key) == pytest.approx(getattr(original, key)), key


def test_large_conversions_are_written_in_shards_one_at_a_time(tiny_model, tmp_path: Path) -> None:
    from infergrid.worker.gguf_checkpoint import write_weights
    from infergrid.worker.loader import iterate_weights, safetensors_files

    weights = dict(iterate_weights(tiny_model("llama_untied")))
    largest = max(t.numel() * t.element_size() for t in weights.values())
    write_weights(iter(weights.items()), str(tmp_path), skip={"lm_head.weight"}, max_shard_bytes=largest)
    files = safetensors_files(str(tmp_path))
    assert len(files) > 2 and all(Path(f).name.startswith("model-") for f in files)
    assert not list(tmp_path.glob(".shard-*"))
    read = dict(iterate_weights(str(tmp_path)))
    assert set(read) == set(weights) - {"lm_head.weight"}
    assert all(torch.equal(read[k], weights[k]) for k in read)


def test_llama3_rope_divisors_become_the_rope_scaling_config(tmp_path: Path) -> None:
    """llama.cpp stores Llama 3.1+ RoPE scaling as per-frequency divisors; they are matched back to
    Llama 3's parameters (and equal what transformers' llama3 rotary computes), anything else refused."""
    import gguf
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from infergrid.worker.gguf_checkpoint import gguf_config, llama3_rope_divisors

    f32 = gguf.GGMLQuantizationType.F32
    divisors = llama3_rope_divisors(16, 10000.0, 32.0, 1.0, 4.0, 8192).astype(np.float32)
    hf = LlamaConfig(hidden_size=64, num_attention_heads=4, rope_theta=10000.0, max_position_embeddings=16384,
                     rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    plain = 1.0 / 10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    np.testing.assert_allclose(divisors, (plain / scaled.double()).numpy(), rtol=1e-5)
    assert 1.0 in divisors and 32.0 in divisors and len(set(divisors.tolist())) > 2  # all three regimes

    path = write_gguf(tmp_path / "l3.gguf", "llama", {"rope_freqs.weight": (divisors, f32)})
    config = gguf_config(gguf.GGUFReader(str(path)))
    assert config["rope_scaling"] == {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    odd = write_gguf(tmp_path / "odd.gguf", "llama", {"rope_freqs.weight": (divisors[::-1].copy(), f32)})
    with pytest.raises(GGUFError, match="rope_freqs.weight does not follow Llama 3 RoPE scaling"):
        gguf_config(gguf.GGUFReader(str(odd)))
