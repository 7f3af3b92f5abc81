"""Sources: sharded safetensors, GGUF (dequantization and llama.cpp's Q/K permutation undone), bad inputs."""
import hashlib
import json
import math

import gguf
import numpy as np
import pytest
import torch
from nqfmt.keys import GGMLType
from gguf.quants import dequantize, quantize

import hf_tiny
from converter.torch_model import TorchModel
from converter.sources import SourceError, config_from_gguf, open_source
from nqfmt import keys as K

# rows of 96 let q/k/v/gate/up and the embedding be Q8_0 (o: 72, down: 100 cannot); Gemma 3 as llama.cpp runs it
# (queries scaled by head_dim^-0.5); Llama 3 RoPE scaling with Meta's band edges, whose head dims fall in all three
# bands (wavelengths 6 to 10^6 around 2048..8192)
GGUF_SIZES = {"llama": dict(hidden_size=96, rope_theta=10_000.0, rope_scaling=None),
              "llama3": dict(hidden_size=96, rope_theta=500_000.0,
                             rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                               high_freq_factor=4.0, original_max_position_embeddings=8192)),
              "gemma3": dict(hidden_size=96, query_pre_attn_scalar=hf_tiny.HEAD_DIM)}


def llamacpp_rope_factors(theta: float, head_dim: int, scaling: dict) -> np.ndarray:
    """What llama.cpp's converter writes as rope_freqs.weight for Llama 3 scaling: each frequency's divisor."""
    factors = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        old = scaling["original_max_position_embeddings"]
        if wavelen < old / scaling["high_freq_factor"]:
            factors.append(1.0)
        elif wavelen > old / scaling["low_freq_factor"]:
            factors.append(scaling["factor"])
        else:
            smooth = (old / wavelen - scaling["low_freq_factor"]) / (scaling["high_freq_factor"]
                                                                    - scaling["low_freq_factor"])
            factors.append(1 / ((1 - smooth) / scaling["factor"] + smooth))
    return np.array(factors, dtype=np.float32)

_HF_TO_GGUF = {"self_attn.q_proj": K.ATTN_Q, "self_attn.k_proj": K.ATTN_K, "self_attn.v_proj": K.ATTN_V,
               "self_attn.o_proj": K.ATTN_OUT, "mlp.gate_proj": K.FFN_GATE, "mlp.up_proj": K.FFN_UP,
               "mlp.down_proj": K.FFN_DOWN, "input_layernorm": K.ATTN_NORM, "post_attention_layernorm": K.FFN_NORM,
               "self_attn.q_norm": K.ATTN_Q_NORM, "self_attn.k_norm": K.ATTN_K_NORM}


_GEMMA_NORMS = {"post_attention_layernorm": K.ATTN_POST_NORM, "pre_feedforward_layernorm": K.FFN_NORM,
                "post_feedforward_layernorm": K.FFN_POST_NORM}
_LLAMACPP_GEMMA_NAMES = {K.ATTN_POST_NORM: "post_attention_norm", K.FFN_POST_NORM: "post_ffw_norm"}


def llamacpp_name(name: str, arch: str) -> str:
    """llama.cpp's name for one of our tensor names."""
    parts = name.split(".")
    if arch == "gemma3" and len(parts) == 4:
        parts[2] = _LLAMACPP_GEMMA_NAMES.get(parts[2], parts[2])
    return ".".join(parts)


def gguf_name(hf_name: str, arch: str = "llama") -> str:
    """Our (llama.cpp-style) name for a Hugging Face tensor name."""
    if hf_name == "model.embed_tokens.weight":
        return K.TOKEN_EMBD
    if hf_name == "model.norm.weight":
        return K.OUTPUT_NORM
    if hf_name == "lm_head.weight":
        return K.OUTPUT
    _, _, layer, rest = hf_name.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    names = {**_HF_TO_GGUF, **_GEMMA_NORMS} if arch == "gemma3" else _HF_TO_GGUF
    return f"blk.{layer}.{names[module]}.{kind}"


def llamacpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """What llama.cpp's converter does to Q/K rows: pair dimension i with i + head_dim/2, interleaved."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_type(name: str, w: np.ndarray) -> GGMLType:
    if w.ndim == 1 or ".ffn_down." in name:
        return GGMLType.F32
    return GGMLType.Q8_0 if w.shape[1] % 32 == 0 else GGMLType.F16


def roundtrip(w: np.ndarray, gtype: GGMLType) -> np.ndarray:
    """The float32 values a tensor of this type holds."""
    if gtype == GGMLType.F32:
        return w
    if gtype == GGMLType.F16:
        return w.astype(np.float16).astype(np.float32)
    return dequantize(quantize(w, gtype), gtype).reshape(w.shape)


@pytest.fixture(scope="module", params=["llama", "llama3", "qwen2", "qwen3", "gemma3"])
def tiny_gguf(request, tmp_path_factory):
    """A GGUF written the way llama.cpp writes one (Q/K rows permuted for llama only; qwen2 biases, qwen3 q/k norms;
    Gemma 3 norms stored as 1 + w under its own post-norm names; mixed F32/F16/Q8_0), and the HF model holding
    exactly the values the file stores."""
    variant = request.param
    arch = "llama" if variant == "llama3" else variant
    model = hf_tiny.build(arch, **GGUF_SIZES.get(variant, GGUF_SIZES["llama"]))
    model.config._attn_implementation = "eager"
    cfg = model.config
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    w = gguf.GGUFWriter(path, arch)
    w.add_name(f"tiny {variant}")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    theta = {"gemma3": 1e6, "llama3": 500_000.0}.get(variant, 10_000.0)
    w.add_rope_freq_base(theta)
    if variant == "llama3":
        w.add_tensor("rope_freqs.weight", llamacpp_rope_factors(theta, cfg.head_dim, cfg.rope_parameters))
    if arch == "gemma3":
        w.add_sliding_window(cfg.sliding_window)
        w.add_sliding_window_pattern([t == "sliding_attention" for t in cfg.layer_types])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([chr(33 + i) for i in range(hf_tiny.VOCAB - 1)] + ['!"'])
    w.add_token_types([1] * hf_tiny.VOCAB)
    w.add_token_merges(["! \""])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.add_chat_template(hf_tiny.CHAT_TEMPLATE)
    stored = {}
    for hf_name, p in model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        name = gguf_name(hf_name, arch)
        a = p.numpy().astype(np.float32)
        gtype = gguf_type(name, a)
        if arch == "gemma3" and name.endswith("norm.weight"):
            a = a + np.float32(1.0)
            stored[hf_name] = a - np.float32(1.0)
        else:
            stored[hf_name] = roundtrip(a, gtype)
        if arch == "llama" and name.endswith((".attn_q.weight", ".attn_k.weight")):
            heads = cfg.num_attention_heads if ".attn_q." in name else cfg.num_key_value_heads
            a = llamacpp_permute(a, heads)
        raw = {GGMLType.Q8_0: lambda: quantize(a, gtype), GGMLType.F16: lambda: a.astype(np.float16), GGMLType.F32: lambda: a}[gtype]()
        w.add_tensor(llamacpp_name(name, arch), raw, raw_dtype=gtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with torch.no_grad():
        for hf_name, a in stored.items():
            model.state_dict()[hf_name].copy_(torch.from_numpy(a))
    return path, model, stored


def test_gguf_weights_are_unpermuted_and_dequantized(tiny_gguf):
    path, model, stored = tiny_gguf
    source = open_source(str(path))
    arch = source.config.arch
    assert model.config.model_type.startswith(arch) and source.name.startswith(f"tiny {arch}")
    scaling = "llama3" if source.name == "tiny llama3" else "none"
    assert (source.config.rope_scaling_type, source.config.rope_scaling_factor) == (scaling, 8.0 if scaling != "none"
                                                                                   else 1.0)
    assert source.config.hidden == 96 and source.config.tie_embeddings == model.config.tie_word_embeddings
    for hf_name, want in stored.items():
        np.testing.assert_array_equal(source.tensor(gguf_name(hf_name, arch)).numpy(), want, err_msg=hf_name)
    assert source.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_gguf_logits_match_transformers_on_the_stored_values(tiny_gguf):
    path, model, _ = tiny_gguf
    ours = TorchModel.from_source(open_source(str(path)))
    tokens = torch.randint(0, hf_tiny.VOCAB, (2, 10), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), model(tokens).logits, rtol=0, atol=1e-4)


def test_gguf_gemma_layer_pattern_default():
    """Without a sliding_window_pattern key, llama.cpp makes every 6th Gemma 3 layer global."""
    values = {"gemma3.block_count": 12, "gemma3.embedding_length": 96, "gemma3.attention.head_count": 4,
              "gemma3.attention.key_length": 32, "gemma3.feed_forward_length": 100, "gemma3.vocab_size": 91,
              "gemma3.attention.layer_norm_rms_epsilon": 1e-6, "gemma3.attention.sliding_window": 8}
    config = config_from_gguf("gemma3", lambda key, default: values.get(key, default), {K.TOKEN_EMBD})
    assert config.sliding_layers == tuple(i not in (5, 11) for i in range(12))
    assert config.attention_scale == np.float32(32 ** -0.5) and config.rope_theta_local == 10_000.0


def test_gguf_rope_factors_of_another_schedule_are_refused():
    values = {"llama.block_count": 2, "llama.embedding_length": 96, "llama.attention.head_count": 4,
              "llama.feed_forward_length": 100, "llama.vocab_size": 91, "llama.attention.layer_norm_rms_epsilon": 1e-6}
    factors = llamacpp_rope_factors(500_000.0, 24, dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                                        original_max_position_embeddings=8192)).astype(np.float64)
    get = lambda key, default: values.get(key, default)  # noqa: E731
    values["llama.rope.freq_base"] = 500_000.0
    assert config_from_gguf("llama", get, {K.TOKEN_EMBD}, factors).rope_scaling_type == "llama3"
    factors[5] *= 1.1
    with pytest.raises(SourceError, match="rope_freqs"):
        config_from_gguf("llama", get, {K.TOKEN_EMBD}, factors)


def test_gguf_tokenizer_metadata(tiny_gguf):
    path, _, _ = tiny_gguf
    tok = open_source(str(path)).tokenizer
    assert tok.chat_template == hf_tiny.CHAT_TEMPLATE and (tok.bos_id, tok.eos_id) == (0, 1) and not tok.add_bos
    assert open_source(str(path)).hf_tokenizer().encode("$#").ids == [3, 2]


def test_sharded_checkpoint(tmp_path):
    model = hf_tiny.save("qwen2", tmp_path, shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    model.config._attn_implementation = "eager"
    source = open_source(str(tmp_path))
    tokens = torch.randint(0, hf_tiny.VOCAB, (1, 7), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(TorchModel.from_source(source)(tokens), model(tokens).logits, rtol=0, atol=1e-4)
    assert source.tokenizer.chat_template == hf_tiny.CHAT_TEMPLATE and source.tokenizer.eos_id == 1
    assert len(source.sha256) == 64


def test_bfloat16_checkpoint(tmp_path):
    model = hf_tiny.build("qwen3").to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text(hf_tiny.TINY_TOKENIZER)
    source = open_source(str(tmp_path))
    weight = source.tensor("blk.1.ffn_up.weight")
    assert weight.dtype == torch.float32
    torch.testing.assert_close(weight, model.model.layers[1].mlp.up_proj.weight.float(), rtol=0, atol=0)


def test_gemma3_image_text_checkpoint_converts_its_text_model(tmp_path):
    model = hf_tiny.save_gemma3_multimodal(tmp_path)
    model.config.text_config._attn_implementation = "eager"
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["model_type"] == "gemma3" and "text_config" in raw
    source = open_source(str(tmp_path))
    assert source.config.arch == "gemma3" and source.config.sliding_layers == (True, False)
    tokens = torch.randint(0, hf_tiny.VOCAB, (1, 11), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        torch.testing.assert_close(TorchModel.from_source(source)(tokens), model(tokens).logits, rtol=0, atol=1e-4)


@pytest.mark.parametrize("post_processor,flag,expected", [(True, False, True), (False, True, True),
                                                           (False, False, False)])
def test_bos_expectation(tmp_path, post_processor, flag, expected):
    """add_bos says whether the model's text starts with BOS, whether the flag or the post-processor says so
    (Llama 3 sets no flag); the runtime encodes without the post-processor and adds BOS itself."""
    from tokenizers import Tokenizer, processors

    hf_tiny.save("llama", tmp_path)
    tok = Tokenizer.from_str(hf_tiny.TINY_TOKENIZER)
    tok.add_special_tokens(["<s>"])
    if post_processor:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    (tmp_path / "tokenizer.json").write_text(tok.to_str())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "add_bos_token": flag}))
    info = open_source(str(tmp_path)).tokenizer
    assert info.bos_id == 2 and info.add_bos == expected


def test_block_weights_keys(tmp_path):
    hf_tiny.save("qwen2", tmp_path)
    source = open_source(str(tmp_path))
    weights = source.block_weights(1)
    assert set(weights) == ({f"{lin}.weight" for lin in K.LINEARS} | {f"{lin}.bias" for lin in K.BIASED_LINEARS}
                            | {f"{n}.weight" for n in source.config.block_norms()})
    assert weights["attn_q.weight"].dtype == torch.float32 and weights["attn_q.weight"].shape == (72, 72)
    with pytest.raises(KeyError):
        source.tensor("blk.9.attn_q.weight")


# --- bad inputs: one clear line each ---------------------------------------------------------------------------------

def _error(spec) -> str:
    with pytest.raises(SourceError) as info:
        open_source(str(spec))
    message = str(info.value)
    assert "\n" not in message and message
    return message


@pytest.fixture
def saved_llama(tmp_path):
    hf_tiny.save("llama", tmp_path)
    return tmp_path


def test_missing_config(saved_llama):
    (saved_llama / "config.json").unlink()
    assert "config.json" in _error(saved_llama)


def test_unsupported_architecture(saved_llama):
    cfg = json.loads((saved_llama / "config.json").read_text())
    (saved_llama / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    message = _error(saved_llama)
    assert "gpt2" in message and "llama" in message and "qwen3" in message and "gemma3" in message


def test_corrupt_safetensors_header(saved_llama):
    weights = saved_llama / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:40] = b"{not json at all" + bytes(16)
    weights.write_bytes(bytes(data))
    assert "model.safetensors" in _error(saved_llama)


def test_truncated_safetensors(saved_llama):
    weights = saved_llama / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert "model.safetensors" in _error(saved_llama)


def test_missing_shard(tmp_path):
    hf_tiny.save("llama", tmp_path, shard_size="40KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    assert shard.name in _error(tmp_path)


def test_missing_tensor(saved_llama):
    from safetensors.torch import load_file, save_file

    tensors = load_file(saved_llama / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, saved_llama / "model.safetensors")
    assert "model.layers.1.mlp.up_proj.weight" in _error(saved_llama)


def test_config_that_does_not_match_the_weights(saved_llama):
    cfg = json.loads((saved_llama / "config.json").read_text())
    (saved_llama / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 101}))
    message = _error(saved_llama)
    assert "mlp.gate_proj.weight" in message and "[100, 72]" in message and "[101, 72]" in message


def test_config_transformers_rejects(saved_llama):
    cfg = json.loads((saved_llama / "config.json").read_text())
    (saved_llama / "config.json").write_text(json.dumps({**cfg, "num_attention_heads": "three"}))
    assert "config.json" in _error(saved_llama)


def test_no_weights(saved_llama):
    (saved_llama / "model.safetensors").unlink()
    assert "safetensors" in _error(saved_llama)


def test_nonexistent_path(tmp_path):
    assert "no such file" in _error(tmp_path / "nothing")


def test_not_a_gguf(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"GGUF" + bytes(range(200)))
    assert "model.gguf" in _error(bad)
    other = tmp_path / "weights.bin"
    other.write_bytes(b"x")
    assert "weights.bin" in _error(other)


def test_unsupported_gguf_architecture(tmp_path):
    path = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(path, "gpt2")
    w.add_tensor("token_embd.weight", np.ones((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    message = _error(path)
    assert "gpt2" in message and "llama" in message
