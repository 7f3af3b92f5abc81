"""Build the transformers model a `.nq` file describes, with each factored linear expanded to its dense float64
weight, so the numpy reference backend can be checked against transformers' own forward (tests only: torch)."""
from __future__ import annotations

import numpy as np
from nqfmt.keys import GGMLType
from gguf.quants import dequantize

from nqfmt import HotRows, NQFile, unpack_signs
from nqfmt import keys as K

_HF_LINEAR = {K.ATTN_Q: "self_attn.q_proj", K.ATTN_K: "self_attn.k_proj", K.ATTN_V: "self_attn.v_proj",
              K.ATTN_OUT: "self_attn.o_proj", K.FFN_GATE: "mlp.gate_proj", K.FFN_UP: "mlp.up_proj",
              K.FFN_DOWN: "mlp.down_proj"}


def dense_weight(nq: NQFile, layer: int, linear: str) -> np.ndarray:
    """Σ_paths diag(s_out)·U·diag(s_mid)·V·diag(s_in), float64."""
    return _expanded(nq.linear(layer, linear))


def _expanded(fl) -> np.ndarray:
    w = np.zeros((fl.m, fl.n))
    for p in fl.paths:
        v = unpack_signs(p.v_signs, fl.n, np.float64) * p.scale_in.astype(np.float64)
        u = unpack_signs(p.u_signs, p.rank, np.float64) * p.scale_out.astype(np.float64)[:, None]
        if p.scale_mid is not None:
            u = u * p.scale_mid.astype(np.float64)
        w += u @ v
    return w


def hf_config(nq: NQFile):
    import transformers as tf
    c = nq.config
    rope = {"rope_type": "default", "rope_theta": c.rope_theta}
    if c.rope_scaling_type == "linear":
        rope = {"rope_type": "linear", "factor": c.rope_scaling_factor, "rope_theta": c.rope_theta}
    elif c.rope_scaling_type == "llama3":
        rope = {"rope_type": "llama3", "factor": c.rope_scaling_factor, "low_freq_factor": c.rope_low_freq_factor,
                "high_freq_factor": c.rope_high_freq_factor, "rope_theta": c.rope_theta,
                "original_max_position_embeddings": c.rope_original_context}
    common = dict(vocab_size=c.vocab, hidden_size=c.hidden, intermediate_size=c.ffn, num_hidden_layers=c.n_layers,
                  num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, head_dim=c.head_dim,
                  max_position_embeddings=c.context_length, rms_norm_eps=c.norm_eps,
                  tie_word_embeddings=c.tie_embeddings)
    if c.arch == "gemma3":
        return tf.Gemma3TextConfig(
            **common, rope_parameters={"full_attention": rope, "sliding_attention": {
                "rope_type": "default", "rope_theta": c.rope_theta_local}},
            layer_types=["sliding_attention" if s else "full_attention" for s in c.sliding_layers],
            sliding_window=c.sliding_window, query_pre_attn_scalar=round(c.attention_scale ** -2),
            attn_logit_softcapping=c.attn_softcap or None, final_logit_softcapping=c.final_softcap or None)
    if c.arch == "mistral":
        return tf.MistralConfig(**common, rope_parameters=rope, sliding_window=c.sliding_window or None)
    if c.arch == "qwen2":
        return tf.Qwen2Config(**common, rope_parameters=rope)
    if c.arch == "qwen3":
        return tf.Qwen3Config(**common, rope_parameters=rope)
    return tf.LlamaConfig(**common, rope_parameters=rope, attention_bias=c.attention_bias)


def hf_model(nq: NQFile):
    """A float64 transformers CausalLM holding the file's weights (factored linears expanded)."""
    import torch
    import transformers as tf
    cfg = hf_config(nq)
    cls = {"gemma3": tf.Gemma3ForCausalLM, "mistral": tf.MistralForCausalLM, "qwen2": tf.Qwen2ForCausalLM,
           "qwen3": tf.Qwen3ForCausalLM}.get(nq.config.arch, tf.LlamaForCausalLM)
    cfg._attn_implementation = "eager"
    model = cls(cfg).to(torch.float64).eval()
    c = nq.config
    gemma = c.arch == "gemma3"
    norm_names = {K.ATTN_NORM: "input_layernorm", K.ATTN_Q_NORM: "self_attn.q_norm",
                  K.ATTN_K_NORM: "self_attn.k_norm",
                  K.FFN_NORM: "pre_feedforward_layernorm" if gemma else "post_attention_layernorm",
                  K.ATTN_POST_NORM: "post_attention_layernorm", K.FFN_POST_NORM: "post_feedforward_layernorm"}
    state = {"model.embed_tokens.weight": _table(nq, K.EMBD_TABLE), "model.norm.weight": nq.array(K.OUTPUT_NORM)}
    if not c.tie_embeddings:
        state["lm_head.weight"] = _table(nq, K.OUTPUT_TABLE)
    for i in range(c.n_layers):
        for nm in c.block_norms():
            state[f"model.layers.{i}.{norm_names[nm]}.weight"] = nq.array(K.norm_tensor(i, nm))
        for lin, hf in _HF_LINEAR.items():
            state[f"model.layers.{i}.{hf}.weight"] = dense_weight(nq, i, lin)
            if K.bias_tensor(i, lin) in nq.tensors:
                state[f"model.layers.{i}.{hf}.bias"] = nq.array(K.bias_tensor(i, lin))
    tensors = {k: torch.from_numpy(np.asarray(v, dtype=np.float64)) for k, v in state.items()}
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    return model


def _table(nq: NQFile, table: str) -> np.ndarray:
    """An embedding/head table as float64: Q8_0 and Q4_0 through gguf's reference dequantizer, hot rows put in their
    tokens' places (spec §3.4), a binary-factored one expanded."""
    kind = nq.tables[table]
    if isinstance(kind, HotRows):
        cold, ids, hot = nq.hot_table(table)
        out = np.empty((nq.config.vocab, nq.config.hidden))
        out[np.setdiff1d(np.arange(nq.config.vocab), ids)] = dequantize(cold, kind.gtype)
        out[ids] = dequantize(hot, GGMLType.Q8_0)
        return out
    if not isinstance(kind, GGMLType):
        return _expanded(nq.factored_table(table))
    name = K.dense_table_tensor(table)
    if kind in K.BLOCK_TYPES:
        return dequantize(nq.array(name), kind).astype(np.float64)
    return nq.array(name).astype(np.float64)


def hf_logits(nq: NQFile, ids: np.ndarray) -> np.ndarray:
    import torch
    model = hf_model(nq)
    with torch.no_grad():
        return model(torch.from_numpy(ids[None])).logits[0].numpy()
