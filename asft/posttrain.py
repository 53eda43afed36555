"""Post-training of pi_ref: A-SFT and its baselines in one framework (METHODS.md sections 5-6).

Every method starts from the base model (pi_ref), sees the same training contexts (every scored
position of the training windows), the same N candidates per context where it uses candidates,
the same optimiser and epoch budget (``posttrain.train``) and the same validation-based selection.
Dropout is disabled during post-training (as TRL does), so the policy starts exactly at pi_ref.

Methods (``posttrain.methods``):

=============  ==========  =================================================================
name           family      data and loss
=============  ==========  =================================================================
sft            weighted    logged next items, all weights 1 (behaviour cloning)
rwr            weighted    logged next items, w = r (linear; the rating, else the ensemble)
asft           weighted    N sampled candidates, w = transform(A/lambda) from ``advantage``
asft_logged    weighted    logged (s, a, rating): exp((r - mean r)/lambda); no reward model
asft_mix       weighted    sampled candidates + the logged item, all scored by the ensemble
asft_full      full        full-catalogue A-SFT: soft-target cross-entropy to the exact tilted
                           policy pi_ref * exp(A/lambda) / Z over every item (no sampling),
                           A = ensemble reward / its centring std (``advantage.lam`` units)
anchor_only    weighted    control: the same pi_ref candidates with uniform weights (+ anchor);
                           what A-SFT gains over it is what the reward adds
rft            rounds      best-of-N: keep the top share of each context's candidates, SFT on
                           them; each round re-samples from the current policy, with a rising
                           threshold (``rft.keep_fracs``)
rft_asft       rounds      two-stage: filtered SFT (first keep_frac), then A-SFT
dpo / ipo      pairwise    pairs of candidates whose ensemble intervals do not overlap
rloo / grpo    online      G samples per context from the current policy, ensemble reward,
                           group advantages, PPO clip over ``pg.ppo_epochs`` passes per sample,
                           KL to pi_ref (k3 or exact) *added*, entropy bonus
rec_r1         online      GRPO whose reward is NDCG@K of a sampled slate against the user's
                           real next training items (no reward model)
=============  ==========  =================================================================

Weighted family loss: ``-sum(w * log pi(a|s)) / sum(w)`` over the optimizer batch (the global
weight sum: gradient accumulation and data parallelism do not change it). With
``posttrain.mask_history`` (default) ``pi`` is the history-masked policy, the distribution the
candidates were sampled from: pi_ref puts a third of its mass on already-consumed items, and
fitting masked samples with the unmasked softmax drags that mass down through the shared
embeddings and flattens the policy (measured: NDCG@10 0.69x the base for uniform weights). With
``posttrain.anchor_weight`` > 0 each context of the candidate-based methods (asft, asft_mix,
asft_full, anchor_only, rft, rft_asft) also gets its logged item with that weight (the candidates'
weights average 1); ``posttrain.anchor_scope=all`` adds the same anchor to DPO/IPO and the online
methods as a plain-SFT term with the anchor's share of the weighted loss as its coefficient.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from asft.advantages import Weights, compute_weights
from asft.config import Config
from asft.data.preprocess import NUM_SPECIAL, ProcessedData
from asft.losses import (
    clip_fraction,
    dpo_loss,
    entropy_rows,
    group_advantages,
    ipo_loss,
    kl_rows,
    policy_gradient_loss,
    soft_target_loss,
    tilted_target,
    weighted_nll,
)
from asft.models.recommender import backbone, load_recommender, save_recommender
from asft.policy_eval import PolicyScorer
from asft.sampling import (
    TrainContexts,
    collate_inputs,
    gumbel_topk,
    history_mask,
    position_rewards,
    read_candidates,
    sample_candidates,
    score_candidates,
    stack,
)
from asft.training.trainer import Trainer, TrainResult
from asft.utils import seed_everything, write_json

FAMILY = {"sft": "weighted", "rwr": "weighted", "asft": "weighted", "asft_logged": "weighted",
          "asft_mix": "weighted", "asft_full": "full", "anchor_only": "weighted", "rft": "rounds", "rft_asft": "rounds",
          "dpo": "pairwise", "ipo": "pairwise", "rloo": "online", "grpo": "online", "rec_r1": "online"}
# trained on pi_ref's candidates, or on the whole catalogue (the anchor applies)
SAMPLED_METHODS = {"asft", "asft_mix", "asft_full", "anchor_only", "rft", "rft_asft"}
USES_REWARD_MODEL = {"rwr", "asft", "asft_mix", "asft_full", "rft", "rft_asft", "dpo", "ipo", "rloo", "grpo"}


# ---------------------------------------------------------------------------- examples and collation
@dataclass
class Example:
    """Training rows of one window: ``pos`` [M] context positions and per-row payload arrays."""

    window: int
    pos: np.ndarray
    data: dict[str, np.ndarray]


def group_rows(windows: np.ndarray, pos: np.ndarray, payload: dict[str, np.ndarray]) -> list[Example]:
    """Rows (one per window/position/...) grouped into one Example per window (windows ascending)."""
    order = np.lexsort((pos, windows))
    windows, pos = windows[order], pos[order]
    payload = {k: v[order] for k, v in payload.items()}
    uniq, first = np.unique(windows, return_index=True)
    bounds = list(first[1:]) + [len(windows)]
    return [Example(int(w), pos[a:b], {k: v[a:b] for k, v in payload.items()}) for w, a, b in zip(uniq, first, bounds)]


def collate_examples(tc: TrainContexts, examples: list[Example], with_history: bool = False,
                     next_horizon: int = 0) -> dict:
    """Inputs of the examples' windows, the distinct context positions (``ctx_b``, ``ctx_t``), a
    row -> context index (``row_ctx``), the payload arrays concatenated, and optionally each
    context's history mask [C, V] and real next items [C, H] (-1 padded)."""
    ids, am = collate_inputs(tc, [e.window for e in examples])
    ctx_b, ctx_t, row_ctx = [], [], []
    offset = 0
    for b, e in enumerate(examples):
        uniq = np.unique(e.pos)
        ctx_b.append(np.full(len(uniq), b))
        ctx_t.append(uniq)
        row_ctx.append(offset + np.searchsorted(uniq, e.pos))
        offset += len(uniq)
    batch = {"input_ids": ids, "attention_mask": am,
             "ctx_b": torch.from_numpy(np.concatenate(ctx_b).astype(np.int64)),
             "ctx_t": torch.from_numpy(np.concatenate(ctx_t).astype(np.int64)),
             "row_ctx": torch.from_numpy(np.concatenate(row_ctx).astype(np.int64))}
    for k in examples[0].data:
        v = np.concatenate([e.data[k] for e in examples])
        batch[k] = torch.from_numpy(v.astype(np.float32 if v.dtype.kind == "f" else np.int64))
    if with_history:
        hm = history_mask(ids, tc.vocab_size, [tc.before(e.window) for e in examples])[batch["ctx_b"], batch["ctx_t"]]
        hm[:, :NUM_SPECIAL] = True
        for key in ("item", "chosen", "rejected"):  # a logged repeat consumption stays a valid target
            if key in batch:
                hm[batch["row_ctx"], batch[key]] = False
        batch["hist_mask"] = hm
    if next_horizon:
        nxt = np.full((len(batch["ctx_b"]), next_horizon), -1, dtype=np.int64)
        for c, (b, t) in enumerate(zip(batch["ctx_b"].tolist(), batch["ctx_t"].tolist())):
            items = tc.next_items(examples[b].window, t, next_horizon)
            nxt[c, : len(items)] = items
        batch["next_items"] = torch.from_numpy(nxt)
    return batch


def context_log_probs(model, batch: dict) -> torch.Tensor:
    """log pi(.|s) at the batch's distinct contexts: [C, V]. With a ``hist_mask`` in the batch this is
    the history-masked policy (the distribution recommendations and candidates are drawn from);
    without, the full softmax of SFT."""
    h = backbone(model)(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    logits = model.lm_head(h[batch["ctx_b"], batch["ctx_t"]]).float()
    if "hist_mask" in batch:
        logits = logits.masked_fill(batch["hist_mask"], float("-inf"))
    return torch.log_softmax(logits, dim=-1)


# ---------------------------------------------------------------------------- weighted family
def weighted_loss(model, batch: dict, normalizer: float):
    """``-sum(w log pi(a|s)) / normalizer`` with ``normalizer`` the optimizer batch's global weight sum."""
    logp = context_log_probs(model, batch)
    lp = logp[batch["row_ctx"], batch["item"]]
    return weighted_nll(lp, batch["weight"], normalizer), {"weighted_logp": float((lp * batch["weight"]).sum().detach())}


def count_weight(batch: dict) -> float:
    return float(batch["weight"].sum())


def weighted_examples(frame: pd.DataFrame, items: np.ndarray, weights: np.ndarray) -> list[Example]:
    """Rows (context, item, weight) with a positive weight, grouped by window."""
    c, m = items.shape
    keep = weights.ravel() > 0
    rep = np.repeat(np.arange(c), m)[keep]
    return group_rows(frame["window"].to_numpy()[rep], frame["pos"].to_numpy()[rep],
                      {"item": items.ravel()[keep].astype(np.int64), "weight": weights.ravel()[keep].astype(np.float64)})


def _reward_matrix(frame: pd.DataFrame, cfg: Config) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(candidate rewards [C, N], logged-item reward [C], expected reward [C]) for advantage.reward."""
    key = "pess" if cfg.advantage.reward == "pessimistic" else "mean"
    return stack(frame, f"r_{key}"), frame[f"logged_r_{key}"].to_numpy(), frame[f"expected_r_{key}"].to_numpy()


def method_weights(method: str, frame: pd.DataFrame, cfg: Config, keep_frac: float | None = None
                   ) -> tuple[np.ndarray, Weights]:
    """Items [C, M] and their weights for a weighted-family method (or an RFT round)."""
    adv = cfg.advantage
    logged = frame["logged"].to_numpy(np.int64)[:, None]
    if method == "sft":
        return logged, compute_weights(np.zeros(logged.shape), adv, baseline="none", transform="ones")
    if method == "anchor_only":
        cands = stack(frame, "candidates").astype(np.int64)
        return cands, compute_weights(np.zeros(cands.shape), adv, baseline="none", transform="ones")
    if method in ("rwr", "asft_logged"):
        rating = frame["logged_rating"].to_numpy(np.float64)
        has_rating = bool(np.isfinite(rating).all()) and len(rating) > 0
        if method == "asft_logged":
            if not has_rating:
                raise ValueError("asft_logged needs logged ratings (this dataset has none); use asft or asft_mix")
            return logged, compute_weights(rating[:, None], adv, baseline="global_mean", transform="exp")
        r = rating if has_rating else frame["logged_r_mean"].to_numpy(np.float64)
        return logged, compute_weights(r[:, None], adv, baseline="none", transform="linear")
    cand_r, logged_r, expected = _reward_matrix(frame, cfg)
    cands = stack(frame, "candidates").astype(np.int64)
    n = cands.shape[1]
    iw = stack(frame, "sample_iw") if "sample_iw" in frame else None
    if keep_frac is not None:  # rejection sampling: top share by reward
        return cands, compute_weights(cand_r, adv.model_copy(update={"top_q": keep_frac}), baseline="none",
                                      transform="top_q", sample_weights=iw)
    if method == "asft_mix":
        return (np.concatenate([cands, logged], axis=1),
                compute_weights(np.concatenate([cand_r, logged_r[:, None]], axis=1), adv, n_sampled=n,
                                expectation=expected, sample_weights=iw))
    return cands, compute_weights(cand_r, adv, n_sampled=n, expectation=expected, sample_weights=iw)


def with_anchor(items: np.ndarray, w: np.ndarray, frame: pd.DataFrame, anchor: float) -> tuple[np.ndarray, np.ndarray]:
    if anchor <= 0:
        return items, w
    logged = frame["logged"].to_numpy(np.int64)[:, None]
    return np.concatenate([items, logged], axis=1), np.concatenate([w, np.full(logged.shape, anchor)], axis=1)


# ---------------------------------------------------------------------------- pairwise family
def preference_pairs(frame: pd.DataFrame, z: float, per_context: int, ref_col: str = "ref_logp") -> pd.DataFrame:
    """Pairs of sampled candidates ranked by the ensemble mean: best vs worst, second vs second-worst,
    ...; kept only where ``[mean - z std, mean + z std]`` intervals do not overlap."""
    mean, std = stack(frame, "r_mean"), stack(frame, "r_std")
    cands, ref = stack(frame, "candidates").astype(np.int64), stack(frame, ref_col)
    order = np.argsort(-mean, axis=1, kind="stable")
    rows = []
    n = mean.shape[1]
    ar = np.arange(len(frame))
    for j in range(min(per_context, n // 2)):
        w, lo = order[:, j], order[:, n - 1 - j]
        ok = mean[ar, w] - z * std[ar, w] > mean[ar, lo] + z * std[ar, lo]
        rows.append(pd.DataFrame({"window": frame["window"].to_numpy()[ok], "pos": frame["pos"].to_numpy()[ok],
                                  "chosen": cands[ar, w][ok], "rejected": cands[ar, lo][ok],
                                  "ref_w": ref[ar, w][ok], "ref_l": ref[ar, lo][ok]}))
    return pd.concat(rows, ignore_index=True)


def anchor_coef(cfg: Config, method: str) -> float:
    """Coefficient of the added plain-SFT anchor term of the pairwise and online methods (0 unless
    ``posttrain.anchor_scope`` is 'all'): the anchor's share of a candidate-based method's loss."""
    pt = cfg.posttrain
    if pt.anchor_scope != "all" or pt.anchor_weight <= 0 or FAMILY[method] not in ("pairwise", "online"):
        return 0.0
    return pt.anchor_weight / (cfg.sampling.n_candidates + pt.anchor_weight)


def make_pair_loss(kind: str, beta: float, anchor: float = 0.0) -> Callable:
    fn = {"dpo": dpo_loss, "ipo": ipo_loss}[kind]

    def loss_fn(model, batch: dict, normalizer: float):
        logp = context_log_probs(model, batch)
        rc = batch["row_ctx"]
        pw, pl = logp[rc, batch["chosen"]], logp[rc, batch["rejected"]]
        loss = fn(pw, pl, batch["ref_w"], batch["ref_l"], beta, normalizer)
        if anchor > 0:  # mean over pairs of -log pi(logged item of the pair's context)
            loss = loss + anchor * weighted_nll(logp[rc, batch["item"]], None, normalizer)
        h = (pw.detach() - batch["ref_w"]) - (pl.detach() - batch["ref_l"])
        return loss, {"margin_sum": float(h.sum()), "pair_correct": float((h > 0).sum())}

    return loss_fn


def count_rows(batch: dict) -> float:
    return float(len(batch["row_ctx"]))


# ---------------------------------------------------------------------------- online family
def slate_ndcg(slates: torch.Tensor, relevant: torch.Tensor) -> torch.Tensor:
    """NDCG@K of each slate [S, K] against its relevant items [S, H] (-1 = none): binary gains,
    ``1/log2(rank+2)``; 0 when nothing is relevant."""
    k = slates.shape[1]
    hits = (slates.unsqueeze(-1) == relevant.unsqueeze(1)).any(-1).float()  # [S, K]
    disc = 1.0 / torch.log2(torch.arange(k, device=slates.device, dtype=torch.float32) + 2.0)
    dcg = (hits * disc).sum(-1)
    n_rel = (relevant >= 0).sum(-1).clamp(max=k)
    idcg = torch.cumsum(disc, 0)[(n_rel - 1).clamp_min(0)]
    return torch.where(n_rel > 0, dcg / idcg, torch.zeros_like(dcg))


def plackett_luce_logp(logp: torch.Tensor, slates: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """log-probability of ordered slates [S, K] drawn without replacement from the rows' distributions:
    ``sum_k log p(a_k) - log(1 - sum_{j<k} p(a_j))``."""
    lp = logp[rows[:, None], slates]
    p = lp.exp()
    before = torch.cumsum(p, dim=1) - p
    return (lp - torch.log1p(-before.clamp(max=1.0 - 1e-6))).sum(dim=1)


def make_online_loss(method: str, cfg: Config, ref, members: list | None, anchor: float = 0.0) -> Callable:
    """RLOO / GRPO / Rec-R1 loss. With ``pg.ppo_epochs`` K > 1 the trainer takes K optimizer steps on each
    batch: the first pass samples the actions from the current policy and freezes them with their
    log-probabilities (pi_old), their rewards and advantages; later passes reuse them, so the ratio
    pi / pi_old moves away from 1 and the clip can bind (``clip_frac``)."""
    pg = cfg.posttrain.pg
    g = pg.group_size
    kind = "rloo" if method == "rloo" else "grpo"
    reward_key = 2 if cfg.advantage.reward == "pessimistic" else 0
    frozen: dict[bytes, list] = {}  # micro-batch -> [passes left, acts, old logp, adv, reward]

    def batch_key(batch: dict) -> bytes:
        return b"".join(batch[k].cpu().numpy().tobytes() for k in ("input_ids", "ctx_b", "ctx_t"))

    def loss_fn(model, batch: dict, normalizer: float):
        ids, am, b, t = batch["input_ids"], batch["attention_mask"], batch["ctx_b"], batch["ctx_t"]
        banned = batch["hist_mask"]
        h = backbone(model)(input_ids=ids, attention_mask=am).last_hidden_state[b, t]
        logits = model.lm_head(h).float().masked_fill(banned, float("-inf"))
        logp_all = torch.log_softmax(logits, dim=-1)
        c = logits.shape[0]
        rows = torch.arange(c, device=logits.device).repeat_interleave(g)
        key = batch_key(batch) if pg.ppo_epochs > 1 else b""
        with torch.no_grad():
            rh = backbone(ref)(input_ids=ids, attention_mask=am).last_hidden_state[b, t]
            ref_logits = ref.lm_head(rh).float().masked_fill(banned, float("-inf"))
            ref_all = torch.log_softmax(ref_logits, dim=-1)
            if key in frozen:
                entry = frozen[key]
                entry[0] -= 1
                _, acts, old_logp, adv, reward = entry
                if entry[0] <= 0:
                    del frozen[key]
            else:
                if method == "rec_r1":
                    k = cfg.posttrain.rec_r1.slate_size
                    acts = gumbel_topk(logits.detach()[rows], k)  # [C*G, K] slates, without replacement
                    reward = slate_ndcg(acts, batch["next_items"][rows]).view(c, g)
                else:
                    acts = torch.multinomial(logp_all.detach().exp(), g, replacement=True)  # [C, G]
                    scores = position_rewards(members, ids, am, cfg.reward.kappa)[reward_key][b, t]
                    reward = scores.gather(1, acts)
                adv = group_advantages(reward, kind, pg.std_eps)
                old_logp = None
        if method == "rec_r1":
            logp = plackett_luce_logp(logp_all, acts, rows).view(c, g)
            ref_lp = plackett_luce_logp(ref_all, acts, rows).view(c, g)
        else:
            logp, ref_lp = logp_all.gather(1, acts), ref_all.gather(1, acts)
        if old_logp is None:  # first pass: pi_old is the policy that drew the actions
            old_logp = logp.detach()
            if pg.ppo_epochs > 1:
                frozen[key] = [pg.ppo_epochs - 1, acts, old_logp, adv, reward]
        kl = kl_rows(logits, ref_logits)[:, None].expand(c, g) if pg.kl_estimator == "exact" else None
        loss, kl_s = policy_gradient_loss(logp, old_logp, ref_lp, adv, pg.clip, pg.kl_coef, normalizer, kl=kl)
        ent = entropy_rows(logits)
        loss = loss - pg.entropy_coef * ent.sum() * g / normalizer
        if anchor > 0:  # mean over contexts of -log pi(logged item); the normaliser counts C * G samples
            loss = loss + anchor * g * weighted_nll(logp_all[batch["row_ctx"], batch["item"]], None, normalizer)
        return loss, {"reward_sum": float(reward.sum()), "kl_sum": float(kl_s.detach().sum()),
                      "entropy_sum": float(ent.detach().sum()) * g,
                      "clip_frac_sum": float(clip_fraction(logp, old_logp, adv, pg.clip)) * c * g}

    return loss_fn


def make_full_loss(cfg: Config, ref, members: list, reward_scale: float) -> Callable:
    """Full-catalogue A-SFT: at each context the target is the exact tilted policy
    ``pi_ref * exp(r / (scale * lambda)) / Z`` over the history-masked catalogue (``r`` the ensemble's
    training reward, ``scale`` its centring std); each context weighs ``n_candidates`` (as many as the
    sampled A-SFT's candidates) and the logged item ``anchor_weight``."""
    n = float(cfg.sampling.n_candidates)
    anchor = cfg.posttrain.anchor_weight
    reward_key = 2 if cfg.advantage.reward == "pessimistic" else 0
    lam = cfg.advantage.lam

    def loss_fn(model, batch: dict, normalizer: float):
        ids, am, b, t = batch["input_ids"], batch["attention_mask"], batch["ctx_b"], batch["ctx_t"]
        banned = batch["hist_mask"]
        h = backbone(model)(input_ids=ids, attention_mask=am).last_hidden_state[b, t]
        logits = model.lm_head(h).float().masked_fill(banned, float("-inf"))
        with torch.no_grad():
            rh = backbone(ref)(input_ids=ids, attention_mask=am).last_hidden_state[b, t]
            ref_logits = ref.lm_head(rh).float().masked_fill(banned, float("-inf"))
            r = position_rewards(members, ids, am, cfg.reward.kappa)[reward_key][b, t] / reward_scale
            target = tilted_target(ref_logits, torch.nan_to_num(r, neginf=0.0), lam)
        loss = soft_target_loss(logits, target, n, normalizer)
        if anchor > 0:
            lp = torch.log_softmax(logits, dim=-1)[batch["row_ctx"], batch["item"]]
            loss = loss + weighted_nll(lp, torch.full_like(lp, anchor), normalizer)
        kl = kl_rows(logits.detach(), ref_logits)
        return loss, {"kl_sum": float(kl.sum()) * (n + anchor)}

    return loss_fn


# ---------------------------------------------------------------------------- running a method
@dataclass
class PostTrainInputs:
    processed_dir: Path
    ref_dir: Path
    reward_dir: Path | None
    cand_dir: Path | None
    adv_dir: Path | None = None


def _freeze_dropout(model: torch.nn.Module) -> torch.nn.Module:
    for mod in model.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
    return model


def load_policy(ref_dir: str | Path):
    model, vocab, meta = load_recommender(ref_dir)
    return _freeze_dropout(model), vocab, meta


def _train_cfg(cfg: Config, epochs: int | None = None):
    t = cfg.posttrain.train
    return t if epochs is None else t.model_copy(update={"epochs": epochs})


def run_method(method: str, cfg: Config, inputs: PostTrainInputs, out_dir: str | Path,
               on_log: Callable[[dict, int], None] | None = None, progress: bool = True, resume: bool = True) -> dict:
    """Post-train pi_ref with ``method``; writes ``out_dir/best`` (the selected model) and a summary."""
    from asft.models.reward import RewardEnsemble

    if method not in FAMILY:
        raise ValueError(f"unknown post-training method '{method}'; choose from {sorted(FAMILY)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seed = cfg.seed
    seed_everything(seed)
    data = ProcessedData.open(inputs.processed_dir)
    tc = TrainContexts.from_processed(data)
    policy, vocab, ref_meta = load_policy(inputs.ref_dir)
    ref, _, _ = load_policy(inputs.ref_dir)
    for p in ref.parameters():
        p.requires_grad_(False)
    ens = RewardEnsemble.load(inputs.reward_dir) if inputs.reward_dir else None
    if ens is None and method in USES_REWARD_MODEL:
        raise ValueError(f"method '{method}' needs a reward ensemble")
    frame = read_candidates(inputs.cand_dir) if inputs.cand_dir else None
    t0 = time.perf_counter()
    scorer = PolicyScorer.build(data, "valid", ref, cfg.eval.ks, reward_ens=ens,
                                ndcg_tolerance=cfg.posttrain.ndcg_tolerance, batch_size=cfg.eval.batch_size)
    setup_s = time.perf_counter() - t0
    meta = {"method": method, "ref_model": str(inputs.ref_dir), "max_len": ref_meta.get("max_len")}

    def save_best(m, path):
        save_recommender(m, vocab, path, meta=meta)

    def trainer_for(model, examples_cfg, sub: Path, epochs: int | None = None, repeat: int = 1) -> Trainer:
        collate, loss_fn, count_fn = examples_cfg
        return Trainer(model, _train_cfg(cfg, epochs), sub, collate_fn=collate, loss_fn=loss_fn, count_fn=count_fn,
                       evaluate_fn=scorer.evaluate, save_best_fn=save_best, monitor=cfg.posttrain.train.monitor,
                       seed=seed, on_log=on_log, progress=progress, name=f"posttrain-{method}",
                       repeat_batches=repeat)

    family = FAMILY[method]
    extra: dict = {}
    masked = cfg.posttrain.mask_history
    weighted = (lambda ex: collate_examples(tc, ex, with_history=masked), weighted_loss, count_weight)
    if family in ("weighted", "pairwise", "rounds") and frame is None:
        raise ValueError(f"method '{method}' needs the candidate dataset (run the sample/score stages)")

    if family == "weighted":
        if method == "asft" and inputs.adv_dir is not None:
            items, wts = read_advantages(inputs.adv_dir, frame)
        else:
            items, wts = method_weights(method, frame, cfg)
        anchor = cfg.posttrain.anchor_weight if method in SAMPLED_METHODS else 0.0
        items, w = with_anchor(items, wts.weights, frame, anchor)
        examples = weighted_examples(frame, items, w)
        extra["weights"] = _weights_summary(wts, out_dir)
        result = trainer_for(policy, weighted, out_dir).fit(examples, resume=resume)
        results = [result]
    elif family == "pairwise":
        pairs = preference_pairs(frame, cfg.posttrain.dpo.z, cfg.posttrain.dpo.pairs_per_context,
                                 ref_col="ref_logp_masked" if masked else "ref_logp")
        if pairs.empty:
            raise ValueError("no candidate pair has non-overlapping reward intervals; lower posttrain.dpo.z")
        logged = np.array([tc.windows[w][p + 1] for w, p in zip(pairs["window"], pairs["pos"])], dtype=np.int64)
        examples = group_rows(pairs["window"].to_numpy(), pairs["pos"].to_numpy(),
                              {**{k: pairs[k].to_numpy() for k in ("chosen", "rejected", "ref_w", "ref_l")},
                               "item": logged})
        extra["pairs"] = {"pairs": len(pairs), "contexts_with_pairs": int(pairs[["window", "pos"]]
                                                                               .drop_duplicates().shape[0]),
                          "contexts": len(frame)}
        spec = (lambda ex: collate_examples(tc, ex, with_history=masked),
                make_pair_loss(method, cfg.posttrain.dpo.beta, anchor_coef(cfg, method)), count_rows)
        results = [trainer_for(policy, spec, out_dir).fit(examples, resume=resume)]
    elif family == "online":
        horizon = cfg.posttrain.rec_r1.horizon if method == "rec_r1" else 0
        examples = [Example(i, tc.positions(i), {"item": tc.windows[i][tc.positions(i) + 1]})
                    for i in range(len(tc.windows))]
        members = ens.members if ens is not None and method != "rec_r1" else None
        spec = (lambda ex: collate_examples(tc, ex, with_history=True, next_horizon=horizon),
                make_online_loss(method, cfg, ref, members, anchor_coef(cfg, method)), lambda b: float(len(b["ctx_b"]) * cfg.posttrain.pg.group_size))
        trainer = trainer_for(policy, spec, out_dir, repeat=cfg.posttrain.pg.ppo_epochs)
        ref.to(trainer.device)
        for m in members or []:
            m.to(trainer.device)
        results = [trainer.fit(examples, resume=resume)]
    elif family == "full":
        examples = [Example(i, tc.positions(i), {"item": tc.windows[i][tc.positions(i) + 1]})
                    for i in range(len(tc.windows))]
        scale = float(ens.centring.get("std", 1.0)) or 1.0
        per_ctx = cfg.sampling.n_candidates + cfg.posttrain.anchor_weight
        spec = (lambda ex: collate_examples(tc, ex, with_history=True), make_full_loss(cfg, ref, ens.members, scale),
                lambda bt: float(len(bt["ctx_b"]) * per_ctx))
        trainer = trainer_for(policy, spec, out_dir)
        ref.to(trainer.device)
        for m in ens.members:
            m.to(trainer.device)
        extra["reward_scale"] = scale
        results = [trainer.fit(examples, resume=resume)]
    else:  # rounds: rft, rft_asft
        results, rounds = [], []
        fracs = list(cfg.posttrain.rft.keep_fracs)
        plan = [("filter", f) for f in fracs] if method == "rft" else [("filter", fracs[0]), ("asft", None)]
        per_round = max(1, cfg.posttrain.train.epochs // len(plan))
        current, cur_frame = policy, frame
        for r, (kind, frac) in enumerate(plan):
            if r > 0 and method == "rft":  # re-sample from the current policy, score with the ensemble
                cur_frame = sample_candidates(current, tc, cfg.sampling, seed + 101 * r, progress=progress)
                cur_frame = score_candidates(cur_frame, current, ens.members, tc, cfg.sampling,
                                             cfg.reward.kappa, progress=progress)
            items, wts = method_weights("asft", cur_frame, cfg, keep_frac=frac if kind == "filter" else None)
            items, w = with_anchor(items, wts.weights, cur_frame, cfg.posttrain.anchor_weight)
            sub = out_dir / f"round_{r}"
            res = trainer_for(current, weighted, sub, per_round).fit(weighted_examples(cur_frame, items, w),
                                                                     resume=resume)
            results.append(res)
            rounds.append({"round": r, "kind": kind, "keep_frac": frac, "best_metric": res.best_metric,
                           "best_epoch": res.best_epoch, "weights": wts.stats})
            current = load_policy(sub / "best")[0]
        best_r = int(np.argmax([x["best_metric"] for x in rounds]))
        if (out_dir / "best").exists():
            shutil.rmtree(out_dir / "best")
        shutil.copytree(out_dir / f"round_{best_r}" / "best", out_dir / "best")
        extra["rounds"] = rounds
        extra["best_round"] = best_r
    summary = _summarise(method, results, setup_s, extra)
    summary["base_valid"] = {"ndcg@10": scorer.base_ndcg}
    summary["returned_ref"] = summary["best_epoch"] == 0  # no evaluated update beat pi_ref itself
    summary["model_dir"] = str(out_dir / "best")
    write_json(out_dir / "train_summary.json", {**summary, "history": [h for r in results for h in r.history]})
    return summary


def _summarise(method: str, results: list[TrainResult], setup_s: float, extra: dict) -> dict:
    best = max(results, key=lambda r: r.best_metric)
    last = next((dict(h) for h in best.history if h.get("epoch") == best.best_epoch), {})
    return {"method": method, "best_metric": best.best_metric, "best_epoch": best.best_epoch,
            "epochs_run": sum(r.epochs_run for r in results), "steps": sum(r.steps for r in results),
            "train_seconds": sum(r.train_seconds for r in results), "eval_seconds": sum(r.eval_seconds for r in results),
            "setup_seconds": setup_s, "best_valid": last, "stopped_early": any(r.stopped_early for r in results),
            **extra}


def _weights_summary(w: Weights, out_dir: Path) -> dict:
    from asft.plots import histogram

    vals = w.weights.ravel()
    histogram(vals, out_dir / "weights_hist.png", "A-SFT weights", "weight")
    histogram(w.advantages.ravel(), out_dir / "advantages_hist.png", "advantages", "A (standardised)")
    write_json(out_dir / "weights.json", w.stats)
    return dict(w.stats)


# ---------------------------------------------------------------------------- advantages stage
ADVANTAGES_FILE = "advantages.parquet"


def write_advantages(scored_dir: str | Path, cfg: Config, out_dir: str | Path) -> dict:
    """The A-SFT weights of the scored candidates (``advantage`` section), written with their
    statistics and histograms; the ``asft`` method trains on exactly these."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from asft.plots import histogram
    from asft.utils import atomic_dir

    frame = read_candidates(scored_dir)
    items, w = method_weights("asft", frame, cfg)
    table = pa.table({"window": frame["window"].to_numpy(np.int64), "pos": frame["pos"].to_numpy(np.int64),
                      "items": pa.array(list(items.astype(np.int32)), pa.list_(pa.int32())),
                      "advantages": pa.array(list(w.advantages.astype(np.float32)), pa.list_(pa.float32())),
                      "weights": pa.array(list(w.weights.astype(np.float32)), pa.list_(pa.float32()))})
    stats = {**w.stats, "baseline": cfg.advantage.baseline, "transform": cfg.advantage.transform,
             "lambda": cfg.advantage.lam, "reward": cfg.advantage.reward}
    with atomic_dir(out_dir) as tmp:
        pq.write_table(table, tmp / ADVANTAGES_FILE)
        write_json(tmp / "weights.json", stats)
        histogram(w.weights.ravel(), tmp / "weights_hist.png", "A-SFT weights", "weight (mean 1)")
        histogram(w.advantages.ravel(), tmp / "advantages_hist.png", "advantages", "A")
    out_dir = Path(out_dir)
    return {**stats, "advantages_dir": str(out_dir),
            "plots": [str(out_dir / "weights_hist.png"), str(out_dir / "advantages_hist.png")]}


def read_advantages(adv_dir: str | Path, frame: pd.DataFrame) -> tuple[np.ndarray, Weights]:
    adv = pd.read_parquet(Path(adv_dir) / ADVANTAGES_FILE)
    if len(adv) != len(frame) or not (np.array_equal(adv["window"].to_numpy(), frame["window"].to_numpy())
                                      and np.array_equal(adv["pos"].to_numpy(), frame["pos"].to_numpy())):
        raise ValueError(f"{adv_dir}: advantages do not match the scored candidates (re-run the advantages stage)")
    import json

    stats = json.loads((Path(adv_dir) / "weights.json").read_text())
    w = stack(adv, "weights").astype(np.float64)
    return stack(adv, "items").astype(np.int64), Weights(stack(adv, "advantages"), w, np.zeros(w.shape, bool),
                                                         {k: v for k, v in stats.items() if isinstance(v, float)})


# ---------------------------------------------------------------------------- evaluation of several policies
def evaluate_policies(model_dirs: dict[str, str | Path], ref_dir: str | Path, processed_dir: str | Path,
                      reward_dir: str | Path | None, judge_dir: str | Path | None, simulator, cfg: Config,
                      splits: tuple[str, ...] = ("valid", "test")) -> dict[str, dict]:
    """Section-7 reports of several policies (and ``base`` = pi_ref when asked) on the same contexts;
    everything that does not depend on the policy is computed once."""
    from asft.models.reward import RewardEnsemble

    data = ProcessedData.open(processed_dir)
    ref, _, _ = load_policy(ref_dir)
    ens = RewardEnsemble.load(reward_dir) if reward_dir else None
    judge = RewardEnsemble.load(judge_dir) if judge_dir else None
    scorers = {sp: PolicyScorer.build(data, sp, ref, cfg.eval.ks, reward_ens=ens, judge_ens=judge, simulator=simulator,
                                      ndcg_tolerance=cfg.posttrain.ndcg_tolerance, batch_size=cfg.eval.batch_size)
               for sp in splits}
    out = {}
    for name, d in model_dirs.items():
        model = ref if Path(d).resolve() == Path(ref_dir).resolve() else load_policy(d)[0]
        out[name] = {sp: sc.evaluate(model) for sp, sc in scorers.items()}
    return out
