"""Post-training benchmark: every method x reward-model noise x seeds, plus the A-SFT lambda sweep.

    python benchmarks/posttrain.py --work benchmarks/work/rm_sim --out benchmarks/work/posttrain_sim.json \
        --noise none medium high --seeds 3 --lambdas 0.1 0.3 1 3 10
    python benchmarks/posttrain.py --work benchmarks/work/tune_b --data ../shared/data/ml-100k \
        --out benchmarks/work/posttrain_ml100k.json --noise logged --seeds 1 model.dropout=0.5 ...

Runs the core stages directly (no orchestration). ``--work`` must hold (or gets) raw/, processed/
and base/ (pi_ref); those are shared. Reward-model noise is the simulated judges' annotation
noise (``preferences.judge``), so each noise level has its own preference data, training ensemble
(fold 0) and held-out judge (fold 1). Seeds vary sampling, initial data order and on-policy draws
of the post-training stage; data, pi_ref and the reward models are shared across seeds. Every
finished piece is skipped on a re-run, and the JSON is rewritten after each (noise, seed).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from asft.env import configure_environment

configure_environment()

from asft import stages
from asft.config import POSTTRAIN_METHODS, load_config
from asft.posttrain import evaluate_policies

# Annotation noise of the simulated judges behind the reward models; 'logged' = real data as is.
NOISE = {
    "none": ["preferences.judge.noise=0", "preferences.judge.flip_prob=0", "preferences.judge.position_bias=0",
             "preferences.judge.lazy_share=0"],
    "medium": [],  # params.yaml: noise 0.3 (utility std 0.9), 5% flips, 10% position bias, 10% lazy judges
    "high": ["preferences.judge.noise=1.0", "preferences.judge.flip_prob=0.2", "preferences.judge.position_bias=0.3",
             "preferences.judge.lazy_share=0.2"],
    "logged": [],
}


def log(msg: str) -> None:
    print(f"[{datetime.now(UTC):%H:%M:%S}] {msg}", file=sys.stderr, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--data", default=None, help="data source (default: params.yaml's, the simulator)")
    ap.add_argument("--config", default="params.yaml")
    ap.add_argument("--noise", nargs="+", default=["medium"], choices=sorted(NOISE))
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--methods", nargs="+", default=list(POSTTRAIN_METHODS))
    ap.add_argument("--lambdas", nargs="*", type=float, default=[], help="A-SFT lambda sweep (first noise, seed 0)")
    ap.add_argument("--variants", nargs="*", default=[],
                    help="extra A-SFT runs (first noise, seed 0): NAME=key=value,key=value ...")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    base_ov = list(a.overrides) + ([f"data.source={a.data}"] if a.data else [])
    work = Path(a.work)
    out_path = Path(a.out)
    results = json.loads(out_path.read_text()) if out_path.is_file() else {}
    results.setdefault("runs", {})
    results["machine"] = {"python": platform.python_version(), "platform": platform.platform(),
                          "cpus": __import__("os").cpu_count()}
    results["command"] = " ".join(sys.argv)
    cfg0 = load_config(a.config, base_ov)
    if not (work / "raw" / "interactions.parquet").is_file():
        stages.stage_ingest(cfg0, work / "raw")
    if not (work / "processed" / "stats.json").is_file():
        stages.stage_preprocess(work / "raw", cfg0, work / "processed")
    if not (work / "base" / "best" / "model.safetensors").is_file():
        stages.stage_train_base(work / "processed", cfg0, work / "base")
    ref = work / "base" / "best"
    sim = stages.load_simulator(work / "raw")

    def save():
        results["date"] = f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC"
        out_path.write_text(json.dumps(results, indent=1, default=str))

    for noise in a.noise:
        cfg = load_config(a.config, base_ov + NOISE[noise])
        nd = work / f"noise_{noise}"
        t0 = time.perf_counter()
        if not (nd / "preferences" / "pairs.parquet").is_file():
            stages.stage_preferences(work / "raw", work / "processed", cfg, nd / "preferences")
        if not (nd / "reward" / "ensemble.json").is_file():
            log(f"{noise}: training reward ensemble")
            stages.stage_train_reward(work / "processed", nd / "preferences", ref, cfg, nd / "reward", progress=False)
        if not (nd / "judge" / "ensemble.json").is_file():
            log(f"{noise}: training judge ensemble")
            stages.stage_train_judge(work / "processed", nd / "preferences", ref, cfg, nd / "judge", progress=False)
        nres = results["runs"].setdefault(noise, {"reward_setup_seconds": time.perf_counter() - t0})
        nres["reward_models"] = {k: json.loads((nd / k / "train_summary.json").read_text())["members"]
                                 for k in ("reward", "judge")}
        for s in range(a.seeds):
            key = f"seed_{s}"
            done = nres.get(key, {})
            if done and set(a.methods) <= set(done.get("reports", {})):
                continue
            cfg_s = cfg.model_copy(update={"seed": cfg.seed + 1000 * s})
            sd = nd / key
            if not (sd / "scored" / "candidates.parquet").is_file():
                samp = stages.stage_sample(work / "processed", ref, cfg_s, sd / "sampled", progress=False)
                scored = stages.stage_score(sd / "sampled", work / "processed", ref, nd / "reward", cfg_s,
                                            sd / "scored", progress=False)
                stages.stage_advantages(sd / "scored", cfg_s, sd / "advantages")
                done["sampling"] = {"candidates_per_s": samp["candidates_per_s"],
                                    "candidates_scored_per_s": scored["candidates_scored_per_s"],
                                    "contexts": samp["contexts"], "candidates": samp["candidates"]}
            train = done.setdefault("train", {})
            for m in a.methods:
                if m in train:
                    continue
                log(f"{noise} {key}: {m}")
                t1 = time.perf_counter()
                try:
                    summ = stages.stage_posttrain(m, work / "processed", ref, nd / "reward", sd / "scored",
                                                  sd / "advantages", cfg_s, sd / "posttrain" / m, progress=False)
                except ValueError as e:  # e.g. asft_logged without ratings
                    log(f"{m} skipped: {e}")
                    continue
                train[m] = {k: summ.get(k) for k in ("best_metric", "best_epoch", "epochs_run", "steps",
                                                     "train_seconds", "eval_seconds", "weights", "pairs", "best_round")}
                train[m]["wall_seconds"] = time.perf_counter() - t1
                nres[key] = done
                save()
            dirs = {m: sd / "posttrain" / m / "best" for m in train}
            done["reports"] = evaluate_policies({"base": ref, **dirs}, ref, work / "processed", nd / "reward",
                                                nd / "judge", sim, cfg)
            nres[key] = done
            save()
            log(f"{noise} {key}: done")
    if a.lambdas:
        noise = a.noise[0]
        cfg = load_config(a.config, base_ov + NOISE[noise])
        nd = work / f"noise_{noise}"
        sd = nd / "seed_0"
        sweep = results.setdefault("lambda_sweep", {"noise": noise})
        dirs = {}
        for lam in a.lambdas:
            name = f"lam_{lam:g}"
            d = sd / "sweep" / name
            if not (d / "best" / "model.safetensors").is_file():
                log(f"sweep {name}")
                c = cfg.model_copy(update={"advantage": cfg.advantage.model_copy(update={"lam": lam})})
                stages.stage_posttrain("asft", work / "processed", ref, nd / "reward", sd / "scored", None, c, d,
                                       progress=False)
            dirs[name] = d / "best"
        sweep["reports"] = evaluate_policies({"base": ref, **dirs}, ref, work / "processed", nd / "reward",
                                             nd / "judge", sim, cfg)
        save()
    if a.variants:
        noise = a.noise[0]
        nd = work / f"noise_{noise}"
        sd = nd / "seed_0"
        var = results.setdefault("variants", {"noise": noise, "specs": {}})
        dirs = {}
        for spec in a.variants:
            name, _, kv = spec.partition("=")
            ov = [x for x in kv.split(",") if x and not x.startswith("method=")]
            method = next((x.split("=", 1)[1] for x in kv.split(",") if x.startswith("method=")), "asft")
            var["specs"][name] = [f"method={method}", *ov]
            c = load_config(a.config, base_ov + NOISE[noise] + ov)
            d = sd / "variants" / name
            if not (d / "best" / "model.safetensors").is_file():
                log(f"variant {name}: {ov}")
                stages.stage_posttrain(method, work / "processed", ref, nd / "reward", sd / "scored", None, c, d,
                                       progress=False)
            dirs[name] = d / "best"
        cfg = load_config(a.config, base_ov + NOISE[noise])
        var["reports"] = evaluate_policies({"base": ref, **dirs}, ref, work / "processed", nd / "reward",
                                           nd / "judge", sim, cfg)
    save()
    log(f"wrote {out_path}")


if __name__ == "__main__":
    main()
