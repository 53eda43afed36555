"""Bradley-Terry reward models on the generative backbone, and their ensemble (METHODS.md section 4).

A member is the base recommender's backbone (GPT-2 or Llama) with the LM head replaced by a *shallow reward
head*: for a context ``x`` with last hidden state ``h(x)`` and item ``a`` with embedding ``e_a``
(the backbone's item embedding table),

    r(x, a) = (W h(x)) . e_a + b_a

so one forward pass scores every catalog item for a batch of contexts. ``W`` starts at
``head_init_scale * I`` (0: every reward starts at 0; 1: the reward starts as the base model's
logit). An optional pointwise head ``rating(x, a) = (W_r h(x)) . e_a + c_a + mu`` regresses explicit
ratings.

BT rewards are identified only up to a per-context shift, so each member's rewards are centred over
the catalog per context (``r - mean_a r``) before members are combined: the ensemble gives mean,
std and a pessimistic score ``mean - kappa * std``. Centring statistics (mean and std of the
ensemble mean over training contexts x catalog) are saved with the ensemble so rewards can be
standardised comparably across versions.

Saved layout (``save_pretrained``, safetensors only)::

    DIR/ensemble.json           members, kappa, centring statistics
    DIR/member_K/best/          model.safetensors, config.json, item_vocab.json
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import AutoModel, GPT2PreTrainedModel, LlamaPreTrainedModel, PretrainedConfig

from asft.data.preprocess import NUM_SPECIAL, ItemVocab
from asft.evaluation import pad_right, rows_per_chunk
from asft.models.recommender import VOCAB_FILE, backbone, item_embeddings, last_hidden

ENSEMBLE_FILE = "ensemble.json"


@dataclass
class LengthBuckets:
    """A batch of contexts split by length: ``buckets`` are right-padded ``(input_ids, attention_mask)``
    pairs of similar-length contexts; row ``i`` of the batch is row ``restore[i]`` of the buckets' rows
    concatenated in order."""

    buckets: list[tuple[torch.Tensor, torch.Tensor]]
    restore: torch.Tensor

    def __len__(self) -> int:
        return len(self.restore)


def length_order_chunks(lengths: np.ndarray, n_chunks: int) -> list[np.ndarray]:
    """Indices sorted by length (stable) and cut into ``n_chunks`` runs of (nearly) equal count; empty runs
    are dropped. Padding each run to its own longest member wastes far less than padding the whole batch."""
    order = np.argsort(np.asarray(lengths), kind="stable")
    return [c for c in np.array_split(order, max(1, min(int(n_chunks), len(order)))) if len(c)]


def bucket_contexts(contexts: list[np.ndarray], n_buckets: int) -> LengthBuckets:
    """``contexts`` as :class:`LengthBuckets` with at most ``n_buckets`` buckets."""
    chunks = length_order_chunks(np.fromiter(map(len, contexts), dtype=np.int64, count=len(contexts)), n_buckets)
    flat = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int64)
    restore = np.empty_like(flat)
    restore[flat] = np.arange(len(flat))
    return LengthBuckets([pad_right([contexts[i] for i in c]) for c in chunks], torch.from_numpy(restore))


class _RewardHeads:
    """Backbone + shallow reward head (+ optional rating head); mixed into a backbone's PreTrainedModel so
    that ``save_pretrained`` / ``from_pretrained`` work with plain ``transformers``."""

    def _build(self, config: PretrainedConfig) -> None:
        h = config.hidden_size
        setattr(self, self.base_model_prefix, AutoModel.from_config(config))
        self.reward_proj = nn.Linear(h, h, bias=False)
        self.reward_bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.has_rating_head = bool(getattr(config, "reward_rating_head", False))
        if self.has_rating_head:
            self.rating_proj = nn.Linear(h, h, bias=False)
            self.rating_bias = nn.Parameter(torch.zeros(config.vocab_size))
            self.rating_offset = nn.Parameter(torch.tensor(float(getattr(config, "reward_rating_mean", 0.0))))
        self.post_init()

    @classmethod
    def from_base(cls, base: nn.Module, head_init_scale: float = 0.0, rating_head: bool = False,
                  rating_mean: float = 0.0) -> RewardModel:
        """A reward model whose backbone is a copy of ``base``'s (a GPT-2 or Llama LM-head recommender)."""
        klass = reward_class(base.config.model_type)
        cfg = type(base.config).from_dict(base.config.to_dict())
        cfg.reward_rating_head = bool(rating_head)
        cfg.reward_rating_mean = float(rating_mean)
        cfg.architectures = [klass.__name__]
        model = klass(cfg)
        backbone(model).load_state_dict(backbone(base).state_dict())
        with torch.no_grad():
            model.reward_proj.weight.copy_(torch.eye(cfg.hidden_size) * head_init_scale)
            model.reward_bias.zero_()
            if rating_head:
                model.rating_proj.weight.zero_()
                model.rating_bias.zero_()
                model.rating_offset.fill_(float(rating_mean))
        return model

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return last_hidden(self, input_ids, attention_mask)

    def hidden_buckets(self, batch: LengthBuckets) -> torch.Tensor:
        """Last hidden state of every context of a :class:`LengthBuckets` batch, in the original order: [B, H].

        Each bucket runs through the backbone padded only to its own longest context; a right-padded
        context's last real position does not depend on the padding after it, so the result is
        :meth:`hidden` of the whole batch with far less padding."""
        dev = self.device
        parts = [self.hidden(ids.to(dev), am.to(dev)) for ids, am in batch.buckets]
        return torch.cat(parts)[batch.restore.to(dev)]

    def rewards(self, hidden: torch.Tensor) -> torch.Tensor:
        """Reward of every vocabulary token for each context: [B, V] (special tokens are meaningless)."""
        return self.reward_proj(hidden) @ item_embeddings(self).T + self.reward_bias

    def ratings(self, hidden: torch.Tensor) -> torch.Tensor:
        if not self.has_rating_head:
            raise ValueError("this reward model has no rating head")
        return self.rating_proj(hidden) @ item_embeddings(self).T + self.rating_bias + self.rating_offset

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.rewards(self.hidden(input_ids, attention_mask))


class RewardModel(_RewardHeads, GPT2PreTrainedModel):
    """GPT-2 backbone + reward heads. Loadable with ``from_pretrained``."""

    def __init__(self, config: PretrainedConfig):
        super().__init__(config)
        self._build(config)


class LlamaRewardModel(_RewardHeads, LlamaPreTrainedModel):
    """Llama backbone + reward heads. Loadable with ``from_pretrained``."""

    def __init__(self, config: PretrainedConfig):
        super().__init__(config)
        self._build(config)


REWARD_CLASSES = {"gpt2": RewardModel, "llama": LlamaRewardModel}


def reward_class(model_type: str) -> type:
    try:
        return REWARD_CLASSES[model_type]
    except KeyError:
        raise ValueError(f"no reward model for backbone '{model_type}'; known: {sorted(REWARD_CLASSES)}") from None


def save_reward_model(model: RewardModel, vocab: ItemVocab, out_dir: str | Path, meta: dict | None = None) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    getattr(model, "module", model).save_pretrained(out, safe_serialization=True)
    vocab.save(out / VOCAB_FILE)
    (out / "reward_model.json").write_text(json.dumps({"kind": "bt-reward-model", **(meta or {})}, indent=2,
                                                      sort_keys=True))
    return out


def load_reward_model(path: str | Path, device: str | torch.device = "cpu") -> RewardModel:
    path = Path(path)
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"{path}: no model.safetensors (refusing to load any other weight format)")
    model_type = json.loads((path / "config.json").read_text()).get("model_type", "gpt2")
    model = reward_class(model_type).from_pretrained(path, use_safetensors=True).to(device)
    model.eval()
    return model


@torch.no_grad()
def score_contexts(models: list[RewardModel], contexts: list[np.ndarray], batch_size: int = 512,
                   device: str | torch.device = "cpu", head: str = "reward") -> np.ndarray:
    """Scores of every item for each context: [K, N, n_items] (column j is token NUM_SPECIAL + j).

    ``head="reward"``: per-context-centred rewards; ``head="rating"``: predicted ratings.
    """
    # Batches of similar-length contexts (each padded to its own longest), results put back in input order.
    chunks = length_order_chunks(np.fromiter(map(len, contexts), dtype=np.int64, count=len(contexts)),
                                 -(-len(contexts) // batch_size))
    batches = [pad_right([contexts[i] for i in c]) for c in chunks]
    out = []
    for m in models:
        res = np.zeros((len(contexts), m.config.vocab_size - NUM_SPECIAL), dtype=np.float32)
        for c, (ids, am) in zip(chunks, batches):
            h = m.hidden(ids.to(device), am.to(device))
            if head == "rating":
                res[c] = m.ratings(h)[:, NUM_SPECIAL:].float().cpu().numpy()
            else:
                r = m.rewards(h)[:, NUM_SPECIAL:].float()
                res[c] = (r - r.mean(dim=1, keepdim=True)).cpu().numpy()
        out.append(res)
    return np.stack(out)


def score_context_chunks(models: list[RewardModel], contexts: list[np.ndarray], batch_size: int = 512,
                         device: str | torch.device = "cpu", head: str = "reward", memory_mb: float | None = 1024):
    """:func:`score_contexts` streamed: yields ``(start, scores [K, n, n_items])`` for consecutive chunks
    ``contexts[start : start + n]`` sized so that a chunk's scores (and the ensemble statistics a caller
    derives from them) fit ``memory_mb``; the same values as one dense call."""
    n_items = models[0].config.vocab_size - NUM_SPECIAL
    rows = rows_per_chunk((2 * len(models) + 5) * n_items * 4, memory_mb, max(1, len(contexts)))
    for s in range(0, len(contexts), rows):
        yield s, score_contexts(models, contexts[s : s + rows], batch_size, device, head)


@dataclass
class EnsembleScores:
    """Ensemble rewards of every vocabulary token ([N, V]; special tokens -inf in mean/pessimistic, 0 in std)."""

    mean: np.ndarray
    std: np.ndarray
    pessimistic: np.ndarray
    members: np.ndarray  # [K, N, V]

    def at(self, items: np.ndarray) -> dict[str, np.ndarray]:
        """Scores of one item per context (``items`` [N] tokens)."""
        rows = np.arange(len(items))
        return {"mean": self.mean[rows, items], "std": self.std[rows, items],
                "pessimistic": self.pessimistic[rows, items], "members": self.members[:, rows, items]}


class RewardEnsemble:
    """K Bradley-Terry members scoring (history, item); mean, std and pessimistic rewards."""

    def __init__(self, members: list[RewardModel], vocab: ItemVocab, kappa: float = 1.0,
                 centring: dict | None = None, meta: dict | None = None):
        if not members:
            raise ValueError("a reward ensemble needs at least one member")
        self.members, self.vocab, self.kappa = members, vocab, kappa
        self.centring = centring or {"mean": 0.0, "std": 1.0}
        self.meta = meta or {}

    @property
    def device(self) -> torch.device:
        return next(self.members[0].parameters()).device

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> RewardEnsemble:
        path = Path(path)
        info_path = path / ENSEMBLE_FILE
        if not info_path.is_file():
            raise FileNotFoundError(f"{path}: not a reward ensemble (no {ENSEMBLE_FILE})")
        info = json.loads(info_path.read_text())
        dirs = info.get("member_dirs")
        if not isinstance(dirs, list) or not dirs or not all(isinstance(m, str) for m in dirs):
            raise ValueError(f"{info_path}: 'member_dirs' must be a non-empty list of member directories")
        root = path.resolve()
        for m in dirs:  # an ensemble only ever loads weights from inside its own directory
            if not (path / m).resolve().is_relative_to(root):
                raise ValueError(f"{info_path}: member_dirs entry '{m}' points outside {path}")
        members = [load_reward_model(path / m, device) for m in dirs]
        vocab = ItemVocab.load(path / dirs[0] / VOCAB_FILE)
        return cls(members, vocab, info.get("kappa", 1.0), info.get("centring"), info)

    def score_all(self, contexts: list[np.ndarray], standardize: bool = False, batch_size: int = 512) -> EnsembleScores:
        """Score every catalog item for each context in one forward pass per member: dense ``[N, V]`` arrays
        (``(K + 3) x N x V`` floats), for a bounded number of contexts; over many contexts of a large
        catalogue stream :meth:`score_chunks` or gather what is needed with :meth:`score_items`."""
        return self._ensemble(score_contexts(self.members, contexts, batch_size, self.device), standardize)

    def score_chunks(self, contexts: list[np.ndarray], standardize: bool = False, batch_size: int = 512,
                     memory_mb: float | None = 1024):
        """:meth:`score_all` streamed: yields ``(start, EnsembleScores)`` of consecutive chunks of ``contexts``
        whose scores fit ``memory_mb``."""
        for start, per in score_context_chunks(self.members, contexts, batch_size, self.device,
                                               memory_mb=memory_mb):
            yield start, self._ensemble(per, standardize)

    def score_items(self, contexts: list[np.ndarray], items: np.ndarray, standardize: bool = False,
                    batch_size: int = 512, memory_mb: float | None = 1024) -> dict[str, np.ndarray]:
        """Scores of given items only: ``items`` [N, M] tokens, one row per context; returns ``mean``,
        ``std``, ``pessimistic`` [N, M] and ``members`` [K, N, M]. Memory: one chunk plus the result."""
        items = np.asarray(items, dtype=np.int64)
        n, m = items.shape
        out = {"mean": np.empty((n, m), np.float32), "std": np.empty((n, m), np.float32),
               "pessimistic": np.empty((n, m), np.float32),
               "members": np.empty((len(self.members), n, m), np.float32)}
        for start, sc in self.score_chunks(contexts, standardize, batch_size, memory_mb):
            rows = np.arange(sc.mean.shape[0])[:, None]
            it = items[start : start + len(rows)]
            for key in ("mean", "std", "pessimistic"):
                out[key][start : start + len(rows)] = getattr(sc, key)[rows, it]
            out["members"][:, start : start + len(rows)] = sc.members[:, rows, it]
        return out

    def _ensemble(self, per: np.ndarray, standardize: bool) -> EnsembleScores:
        if standardize:
            per = (per - self.centring["mean"]) / self.centring["std"]
        k, n, _ = per.shape
        mean, std = per.mean(axis=0), per.std(axis=0)
        full = np.full((k, n, self.vocab.size), -np.inf, dtype=np.float32)
        full[:, :, NUM_SPECIAL:] = per

        def widen(x: np.ndarray, fill: float) -> np.ndarray:
            out = np.full((n, self.vocab.size), fill, dtype=np.float32)
            out[:, NUM_SPECIAL:] = x
            return out

        return EnsembleScores(mean=widen(mean, -np.inf), std=widen(std, 0.0),
                              pessimistic=widen(mean - self.kappa * std, -np.inf), members=full)

    def score_pairs(self, contexts: list[np.ndarray], ctx_index: np.ndarray, chosen: np.ndarray,
                    rejected: np.ndarray, batch_size: int = 512, memory_mb: float | None = 1024
                    ) -> dict[str, np.ndarray]:
        """Reward differences r(chosen) - r(rejected) per pair: ``members`` [K, P] and ``mean`` [P].

        ``contexts`` are the distinct contexts; pair p uses ``contexts[ctx_index[p]]`` (each context
        is scored once, whatever its number of pairs).
        """
        ctx_index = np.asarray(ctx_index, dtype=np.int64)
        c, r = np.asarray(chosen) - NUM_SPECIAL, np.asarray(rejected) - NUM_SPECIAL
        pc = np.empty((len(self.members), len(ctx_index)), np.float32)
        pr = np.empty_like(pc)
        for start, per in score_context_chunks(self.members, contexts, batch_size, self.device,
                                               memory_mb=memory_mb):  # [K, n, I] chunks, bounded
            sel = np.flatnonzero((ctx_index >= start) & (ctx_index < start + per.shape[1]))
            pc[:, sel] = per[:, ctx_index[sel] - start, c[sel]]
            pr[:, sel] = per[:, ctx_index[sel] - start, r[sel]]
        d = pc - pr
        return {"members": d, "mean": d.mean(axis=0), "std": pc.std(axis=0) / 2 + pr.std(axis=0) / 2}
