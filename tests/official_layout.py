"""A tiny checkpoint as the official Quiet-STaR code (github ezelikman/quiet-star, ``modeling_mistral.py``
and ``configuration_mistral.py`` under transformers 4.37) saves one, written by hand: tensor names and
shapes taken from that code's modules, not from the transformers installed here, so a rename on
either side shows up as a conversion failure."""

import json

import torch
from safetensors.torch import save_file

H, V = 32, 98  # V = 96 base tokens + <|startthought|>, <|endthought|>
LAYERS, HEADS, KV_HEADS, FFN = 2, 4, 2, 64
# zero-shotcot-eval.py loads an 8-ahead model with max_thoughts = n_ahead 8 + n_ahead_talk 1 + 1;
# a checkpoint saved from there records 10 and nothing else about the thought lengths.
EVAL_MAX_THOUGHTS = 8 + 1 + 1
OFFICIAL_ORDER = ("<|startthought|>", "<|endthought|>")  # as both official scripts add them


def official_config(**changes) -> dict:
    """config.json as the official MistralConfig (transformers 4.37) writes it: Mistral's fields,
    ``max_thoughts`` and the head flags the scripts pass; no n_ahead, no n_ahead_talk."""
    cfg = {
        "_name_or_path": "mistralai/Mistral-7B-v0.1", "architectures": ["MistralForCausalLM"],
        "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
        "hidden_size": H, "initializer_range": 0.02, "intermediate_size": FFN, "max_position_embeddings": 128,
        "model_type": "mistral", "num_attention_heads": HEADS, "num_hidden_layers": LAYERS,
        "num_key_value_heads": KV_HEADS, "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": 4096,
        "tie_word_embeddings": False, "torch_dtype": "float32", "transformers_version": "4.37.2", "use_cache": True,
        "vocab_size": V, "max_thoughts": EVAL_MAX_THOUGHTS,
        "merged_talk_heads": True, "merged_lm_and_talk_heads": False, "merged_lm_and_think_heads": True,
        "use_concat_talk_head": True, "use_shallow_think": True, "use_shallow_talk": False,
        "use_complex_think_head": False, "use_complex_talk_head": True, "use_weighted_talk_head": True,
    }
    cfg.update(changes)
    return cfg


def official_shapes() -> dict[str, tuple[int, ...]]:
    """Every persistent tensor of the official MistralForCausalLM (rotary buffers are persistent=False)."""
    head_dim = H // HEADS
    shapes = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,), "lm_head.weight": (V, H)}
    for i in range(LAYERS):
        layer = f"model.layers.{i}."
        shapes.update({
            layer + "self_attn.q_proj.weight": (HEADS * head_dim, H),
            layer + "self_attn.k_proj.weight": (KV_HEADS * head_dim, H),
            layer + "self_attn.v_proj.weight": (KV_HEADS * head_dim, H),
            layer + "self_attn.o_proj.weight": (H, HEADS * head_dim),
            layer + "mlp.gate_proj.weight": (FFN, H),
            layer + "mlp.up_proj.weight": (FFN, H),
            layer + "mlp.down_proj.weight": (H, FFN),
            layer + "input_layernorm.weight": (H,),
            layer + "post_attention_layernorm.weight": (H,),
        })
    # row 0: the delimiter vector / embedding_scale (100); row 1: a log std (reparametrised mode only)
    shapes.update({"start_embedding": (2, H), "end_embedding": (2, H)})
    # the complex weighted talk head: Linear(2H, H), ReLU, Linear(H, H), ReLU, Linear(H, 1, bias=False)
    shapes.update({
        "talk_head.0.0.weight": (H, 2 * H), "talk_head.0.0.bias": (H,),
        "talk_head.0.2.weight": (H, H), "talk_head.0.2.bias": (H,),
        "talk_head.0.4.weight": (1, H),
    })
    return shapes


def official_state_dict(seed: int = 0, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Random tensors in the official layout (trained-like: the talk head's last layer is not zero)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in official_shapes().items():
        scale = 0.01 if name in ("start_embedding", "end_embedding") else 0.02 if name.startswith("talk_head") else 1.0
        state[name] = (torch.randn(shape, generator=g) * scale).to(dtype).contiguous()
    return state


def word_tokenizer(n_words: int, added_tokens=()):
    """An offline fast tokenizer: words t0..t{n-1} (t0 = <unk>, t1 = <s>, t2 = </s>), then ``added_tokens``
    added as the official scripts add the delimiters (``additional_special_tokens``, in that order)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, n_words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    if added_tokens:
        tokenizer.add_special_tokens({"additional_special_tokens": list(added_tokens)})
    return tokenizer


def write_checkpoint(folder, state=None, config=None, shards: int = 1, tokenizer=None):
    """config.json + safetensors (one file or ``shards`` with an index) + the tokenizer, if given."""
    folder.mkdir(parents=True, exist_ok=True)
    state = official_state_dict() if state is None else state
    (folder / "config.json").write_text(json.dumps(official_config() if config is None else config))
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    if shards == 1:
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return folder
    keys, weight_map = sorted(state), {}
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k] for k in keys[s::shards]}
        save_file(part, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder
