"""Random tiny models, one per supported family (DESIGN 9), built in-process from configs."""
import torch
import transformers as tf

VOCAB = 96


def _configs():
    return {
        "opt": tf.OPTConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, ffn_dim=128,
                            num_attention_heads=4, max_position_embeddings=160, word_embed_proj_dim=64),
        "opt-postnorm": tf.OPTConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, ffn_dim=128,
                                     num_attention_heads=4, max_position_embeddings=160,
                                     do_layer_norm_before=False, word_embed_proj_dim=32),
        "llama-gqa": tf.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
        "qwen2": tf.Qwen2Config(vocab_size=VOCAB, hidden_size=96, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=512,
                                tie_word_embeddings=True),
        "mistral": tf.MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=512,
                                    sliding_window=None),
        "mpt": tf.MptConfig(vocab_size=VOCAB, d_model=64, n_heads=4, n_layers=2, expansion_ratio=2,
                            max_seq_len=160),
        "gpt_neox": tf.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_hidden_layers=2,
                                     intermediate_size=128, max_position_embeddings=512,
                                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                      "partial_rotary_factor": 0.5}),
    }


TINY = tuple(_configs())


def tiny_hf_model(name: str, seed: int = 0, **config_changes):
    """config_changes: attributes of the family's tiny config to change (e.g. max_position_embeddings)."""
    config = _configs()[name]
    for key, value in config_changes.items():
        setattr(config, key, value)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    # HF's init (std 0.02) gives near-uniform attention; larger weights make softmax do real work.
    with torch.no_grad():
        for name_, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name_ and "wte" not in name_:
                p.mul_(4.0)
    return model


def ptb_like_ids(batch: int, seq: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))
