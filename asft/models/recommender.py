"""The base generative recommender: a decoder-only transformer whose tokens are catalog items.

Built with ``transformers`` from a config in code, never downloaded; ``model.backbone`` chooses the
blocks: GPT-2 (learned positions, pre-LayerNorm, GELU MLP, dropout everywhere, as in SASRec) or
Llama (RoPE, RMSNorm, SwiGLU). Item embeddings are tied to the output layer in both. Saved with
``save_pretrained`` (safetensors) plus the item vocabulary, so
``AutoModelForCausalLM.from_pretrained(dir)`` loads it with plain ``transformers``.

Sequences are right-padded with ``PAD=0``; the next-item distribution for a sequence is read at its
last real position.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, PretrainedConfig, PreTrainedModel

from asft.config import ModelConfig
from asft.data.preprocess import BOS, EOS, NUM_SPECIAL, PAD, ItemVocab

META_FILE = "recommender.json"
VOCAB_FILE = "item_vocab.json"


def build_model(cfg: ModelConfig, vocab_size: int, max_len: int, seed: int | None = None) -> PreTrainedModel:
    """A fresh, randomly initialised generative recommender."""
    if seed is not None:
        torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(hf_config(cfg, vocab_size, max_len))


def hf_config(cfg: ModelConfig, vocab_size: int, max_len: int) -> PretrainedConfig:
    """The ``transformers`` config of the chosen backbone."""
    n_pos = cfg.n_positions or max_len
    if n_pos < max_len:
        raise ValueError(f"model.n_positions ({n_pos}) < preprocess.max_len ({max_len})")
    if cfg.backbone == "llama":
        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=cfg.n_embd,
            intermediate_size=4 * cfg.n_embd,
            num_hidden_layers=cfg.n_layer,
            num_attention_heads=cfg.n_head,
            num_key_value_heads=cfg.n_head,
            max_position_embeddings=n_pos,
            hidden_act="silu",
            attention_dropout=cfg.dropout,
            rms_norm_eps=1e-6,
            pad_token_id=PAD,
            bos_token_id=BOS,
            eos_token_id=EOS,
            tie_word_embeddings=True,
            use_cache=False,
        )
    return GPT2Config(
        vocab_size=vocab_size,
        n_positions=n_pos,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        n_inner=4 * cfg.n_embd,
        activation_function="gelu",
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
        tie_word_embeddings=True,
        use_cache=False,
    )


def backbone(model: torch.nn.Module) -> torch.nn.Module:
    """The transformer stack without its head (GPT-2's ``transformer``, Llama's ``model``)."""
    return getattr(model, "module", model).base_model


def item_embeddings(model: torch.nn.Module) -> torch.Tensor:
    """The (tied) item embedding table [V, H]."""
    return backbone(model).get_input_embeddings().weight


def last_hidden(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Hidden state at the last real (non-pad) position of each right-padded sequence: [B, H]."""
    hidden = backbone(model)(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    last = attention_mask.sum(dim=1).clamp_min(1) - 1
    return hidden[torch.arange(hidden.size(0), device=hidden.device), last]


def next_item_logits(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Next-token logits over the whole vocabulary for each sequence: [B, V]. Special tokens are
    not items; callers mask them (see :func:`item_mask_value`)."""
    return model.lm_head(last_hidden(model, input_ids, attention_mask))


def all_position_logits(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Next-item logits at every position of each sequence: [B, T, V] (the causal prefix up to t)."""
    return model.lm_head(backbone(model)(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state)


def position_logits(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    positions: torch.Tensor | None = None) -> torch.Tensor:
    """Logits at every real position (flattened, [N_real, V]); avoids the LM head on padding."""
    hidden = backbone(model)(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    sel = attention_mask.bool() if positions is None else positions
    return model.lm_head(hidden[sel])


def mask_special(logits: torch.Tensor) -> torch.Tensor:
    """Special tokens can never be recommended."""
    logits[..., :NUM_SPECIAL] = float("-inf")
    return logits


def save_recommender(model: PreTrainedModel, vocab: ItemVocab, out_dir: str | Path, meta: dict | None = None) -> Path:
    """``save_pretrained`` (safetensors) + item vocabulary + metadata in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    unwrapped = getattr(model, "module", model)
    unwrapped.save_pretrained(out, safe_serialization=True)
    vocab.save(out / VOCAB_FILE)
    info = {"kind": "generative-recommender", "num_special": NUM_SPECIAL, "n_items": vocab.n_items}
    info.update(meta or {})
    (out / META_FILE).write_text(json.dumps(info, indent=2, sort_keys=True))
    return out


def load_recommender(path: str | Path, device: str | torch.device = "cpu") -> tuple[PreTrainedModel, ItemVocab, dict]:
    """Load a saved recommender (safetensors only) with its vocabulary and metadata."""
    path = Path(path)
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"{path}: no model.safetensors (refusing to load any other weight format)")
    model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True).to(device)
    model.eval()
    vocab = ItemVocab.load(path / VOCAB_FILE)
    meta = json.loads((path / META_FILE).read_text()) if (path / META_FILE).is_file() else {}
    if model.config.vocab_size != vocab.size:
        raise ValueError(f"{path}: model vocab {model.config.vocab_size} != item vocabulary {vocab.size}")
    return model, vocab, meta
