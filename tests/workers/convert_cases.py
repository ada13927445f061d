"""Tiny HF configs for the conversion parity tests, one or more per family (all well under 1M
parameters), plus the helpers that build and save a randomised HF model from one of them.

Every parameter, norms and biases included, gets random noise so that a swapped or mis-sharded
tensor changes the logits.
"""
from __future__ import annotations

import copy
import os

VOCAB = 200  # not a multiple of 128: every case exercises vocab padding


def _llama(**kw):
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 2,
           "hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4,
           "num_key_value_heads": 2, "vocab_size": VOCAB, "max_position_embeddings": 128,
           "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False,
           "hidden_act": "silu", "attention_bias": False, "mlp_bias": False}
    cfg.update(kw)
    return cfg


# name -> (hf config, options). options: ep (expert-parallel size to check), skip (layouts)
CASES = {
    "llama": (_llama(), {"torch_dist": True}),
    # MQA: one KV group for TP=2 (megatron replicates it); tied embeddings across PP stages;
    # llama3 rope scaling with a short original context so that scaling changes the result
    "llama_mqa_tied": (_llama(num_key_value_heads=1, tie_word_embeddings=True, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}), {}),
    # attention_bias (Q/K/V and o_proj) and mlp_bias (gate/up/down): "llamafied" checkpoints
    "llama_bias": (_llama(attention_bias=True, mlp_bias=True), {}),
    # linear rope scaling by 3 (not a power of two: position/3 rounds, inv_freq/3 too)
    "qwen2": (_llama(architectures=["Qwen2ForCausalLM"], model_type="qwen2", tie_word_embeddings=True,
                     use_sliding_window=False, rope_scaling={"rope_type": "linear", "factor": 3.0}),
              {}),
    # window 8 < the 24-token test sequence: the sliding window changes the logits; YaRN (x2 beyond
    # 8 positions) too
    "mistral": (_llama(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=8,
                       rope_scaling={"rope_type": "yarn", "factor": 2.0,
                                     "original_max_position_embeddings": 8}), {}),
    "mixtral": (_llama(architectures=["MixtralForCausalLM"], model_type="mixtral", num_local_experts=4,
                       num_experts_per_tok=2, router_jitter_noise=0.0, intermediate_size=48), {"ep": 2}),
    "glm": (_llama(architectures=["GlmForCausalLM"], model_type="glm", head_dim=16,
                   partial_rotary_factor=0.5, attention_bias=True, pad_token_id=0), {}),
    "galactica": ({"architectures": ["OPTForCausalLM"], "model_type": "opt", "num_hidden_layers": 2,
                   "hidden_size": 64, "ffn_dim": 128, "num_attention_heads": 4,
                   "word_embed_proj_dim": 64, "vocab_size": VOCAB, "max_position_embeddings": 64,
                   "activation_function": "gelu", "do_layer_norm_before": True, "enable_bias": True,
                   "tie_word_embeddings": True, "pad_token_id": 1, "bos_token_id": 0,
                   "eos_token_id": 2}, {}),
    "bloom": ({"architectures": ["BloomForCausalLM"], "model_type": "bloom", "n_layer": 2,
               "hidden_size": 64, "n_head": 4, "vocab_size": VOCAB, "layer_norm_epsilon": 1e-5,
               "tie_word_embeddings": True}, {}),
    # Falcon-7B shape: multi-query (1 KV group < TP=2), one shared norm, parallel attention + MLP
    "falcon_7b": ({"architectures": ["FalconForCausalLM"], "model_type": "falcon",
                   "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
                   "multi_query": True, "new_decoder_architecture": False, "parallel_attn": True,
                   "alibi": False, "bias": False, "vocab_size": VOCAB,
                   "max_position_embeddings": 64, "tie_word_embeddings": True}, {}),
    # Falcon-40B shape: new decoder architecture, 2 KV groups, two norms, untied head
    "falcon_40b": ({"architectures": ["FalconForCausalLM"], "model_type": "falcon",
                    "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
                    "num_kv_heads": 2, "new_decoder_architecture": True, "parallel_attn": True,
                    "alibi": False, "bias": False, "vocab_size": VOCAB,
                    "max_position_embeddings": 64, "tie_word_embeddings": False}, {}),
    # Falcon-RW shape: ALiBi, biases, sequential layer, multi-head. Reference on SDPA: transformers'
    # eager Falcon path adds the ALiBi bias twice (once in the logits, once folded into the mask)
    "falcon_rw": ({"architectures": ["FalconForCausalLM"], "model_type": "falcon",
                   "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
                   "multi_query": False, "new_decoder_architecture": False, "parallel_attn": False,
                   "alibi": True, "bias": True, "vocab_size": VOCAB,
                   "max_position_embeddings": 64, "tie_word_embeddings": True}, {"attn": "sdpa"}),
}


def build_hf(hf_config: dict, out_dir: str, seed: int = 0, attn: str = "eager"):
    """Build the HF model of ``hf_config`` with noisy weights, save it to ``out_dir``; return it."""
    import torch
    import transformers as T

    torch.manual_seed(seed)
    cfg = T.AutoConfig.for_model(**copy.deepcopy(hf_config))
    model = T.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn)
    model.eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    return model


def load_converted(work: str, case: str, flash: bool = False, inference: bool = True):
    """``case``'s HF model converted (tp=1) into ``work`` once, loaded for generation in this
    process (``generation.loader.load_for_generation``; ``inference``: with the inference-only
    modules)."""
    from megatron_patch.convert.engine import hf_to_megatron
    from megatron_patch.generation.loader import load_for_generation

    cfg, _ = CASES[case]
    hf_dir, mg_dir = os.path.join(str(work), f"{case}_hf"), os.path.join(str(work), f"{case}_mg")
    if not os.path.isdir(mg_dir):
        build_hf(cfg, hf_dir)
        hf_to_megatron(hf_dir, mg_dir, tp=1, log=lambda *a: None)
    return load_for_generation(mg_dir, flash=flash, log=lambda *a: None, inference=inference)
