"""The pipeline's stages, each declared once.

A :class:`StageSpec` names a stage (one name everywhere: CLI subcommand, Prefect task, MLflow stage run,
DVC stage), the core function that runs it (in :mod:`asft.stages`), its input and output paths (relative
to a run directory), the configuration keys it reads and how it runs (resumable training, distributed
under torchrun, validated datasets). From this table:

- ``asft/cli.py`` builds one subcommand per stage: a flag per input, ``--output``, and a typed flag per
  configuration field the stage reads (``--advantage.lam 2``), as TRL's ``HfArgumentParser`` does;
- ``tasks/stages.py`` builds one Prefect task per stage (cache key, tracking, torchrun command line);
- :func:`dvc_stages` generates ``dvc.yaml`` (params from :attr:`StageSpec.params`, code deps from the
  modules the stage really imports), checked by a test;
- the stage cache key (``tasks.lineage``) hashes exactly :attr:`StageSpec.params`.

Adding a stage = one function in :mod:`asft.stages` + one entry in :data:`STAGES`.
"""

from __future__ import annotations

import ast
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PROJECT_PACKAGES = ("asft",)


@dataclass(frozen=True)
class Input:
    """A path the stage reads: ``arg`` is the core function's parameter, ``flag`` the CLI option,
    ``path`` its place in a run directory (and in the DVC workspace)."""

    arg: str
    flag: str
    path: str
    help: str = ""
    required: bool = True
    model: bool = False  # a training output dir or its best/ (the CLI accepts either)


@dataclass(frozen=True)
class StageSpec:
    name: str
    func: str  # function name in asft.stages
    help: str
    inputs: tuple[Input, ...] = ()
    output: str | None = None  # run-relative output dir (or file when ``output_file``)
    output_file: bool = False  # the summary itself is the output (written as JSON)
    params: tuple[str, ...] = ()  # config keys (sections or dotted keys) the stage reads
    docs: str | None = None  # run-relative GX data-docs dir: the stage validates a dataset
    dataset: str | None = None  # the output is a versioned dataset (raw, processed, preferences)
    training: bool = False  # resumable work dir, checkpoints, on_log
    distributed: bool = False  # may run under torchrun (distributed.nproc_per_node > 1)
    progress: bool = False  # takes ``progress=`` (a console progress bar)
    options: tuple[str, ...] = ()  # extra value arguments (``method``)
    foreach: str | None = None  # DVC: one stage instance per value of this config list
    metrics: tuple[str, ...] = ()  # DVC metrics files (run-relative)
    plots: tuple[dict, ...] = ()  # DVC plots definitions (run-relative file + x/y)
    dvc: bool = True
    flow: bool = True
    cache: bool = True  # Prefect stage cache (off for stages whose inputs are this run's own outputs)
    kind: str = "data"  # data | train | eval: picks the timeout
    summary: str = ""  # one console line after the stage, str.format over its summary

    @property
    def function(self) -> Callable[..., dict]:
        from asft import stages

        return getattr(stages, self.func)

    def paths(self, run_dir: str | Path, **fmt: str) -> dict[str, str]:
        """Input paths of this stage inside ``run_dir``."""
        return {i.arg: str(Path(run_dir) / i.path.format(**fmt)) for i in self.inputs}

    def output_path(self, run_dir: str | Path, **fmt: str) -> str | None:
        return None if self.output is None else str(Path(run_dir) / self.output.format(**fmt))


_RAW = Input("raw_dir", "--raw", "raw", "raw dir (canonical interactions; its simulator/ enables simulated judges)")
_PROCESSED = Input("processed_dir", "--processed", "processed", "processed sequences dir")
_PREFS = Input("pref_dir", "--preferences", "preferences", "preference pairs dir")
_BASE = Input("base_model_dir", "--base", "models/base", "base model (training output dir or its best/)",
              model=True)
_REF = Input("ref_dir", "--base", "models/base", "pi_ref: the base model (training output dir or its best/)",
             model=True)
_REWARD = Input("reward_dir", "--reward", "models/reward", "reward ensemble dir")
_JUDGE = Input("judge_dir", "--judge", "models/judge", "held-out judge ensemble dir")
_SCORED = Input("scored_dir", "--scored", "candidates/scored", "scored candidates dir")
_ADV = Input("adv_dir", "--advantages", "advantages", "A-SFT advantages dir")

_DATA_PARAMS = ("seed", "data", "simulator", "preprocess.min_user_events", "validation")
_TRAIN_PARAMS = ("seed", "model", "train", "preprocess.max_len", "eval")
_REWARD_PARAMS = ("seed", "reward")
_POSTTRAIN_PARAMS = ("seed", "advantage", "sampling", "reward.kappa", "eval", "posttrain.mask_history",
                     "posttrain.anchor_weight", "posttrain.anchor_scope", "posttrain.ndcg_tolerance", "posttrain.dpo",
                     "posttrain.pg", "posttrain.rec_r1", "posttrain.rft", "posttrain.train")

STAGES: tuple[StageSpec, ...] = (
    StageSpec("ingest", "stage_ingest", "load (or simulate) and validate the raw log; nothing is written on failure",
              output="raw", params=_DATA_PARAMS, docs="reports/gx/raw", dataset="raw",
              summary="validated {rows} rows ({format})"),
    StageSpec("validate", "stage_validate", "run the raw-data GX suite on a canonical raw dir (writes nothing)",
              inputs=(_RAW,), params=("validation", "preprocess.min_user_events"), docs="reports/gx/raw", dvc=False,
              flow=False),
    StageSpec("preprocess", "stage_preprocess", "k-core, ordering, vocabulary, leave-one-out split (validated)",
              inputs=(_RAW,), output="processed", params=("preprocess", "validation"), docs="reports/gx/processed",
              dataset="processed", summary="{users} users, {items} items, {events} events"),
    StageSpec("preferences", "stage_preferences", "build and validate the preference-pair dataset",
              inputs=(_RAW, _PROCESSED), output="preferences", params=("seed", "preferences", "preprocess.max_len",
                                                                        "validation"),
              docs="reports/gx/preferences", dataset="preferences",
              summary="{pairs} pairs over {contexts} contexts"),
    StageSpec("train-base", "stage_train_base", "next-item SFT of the base generative recommender",
              inputs=(_PROCESSED,), output="models/base", params=_TRAIN_PARAMS, training=True, distributed=True,
              progress=True, kind="train", summary="best valid {best_metric:.4f} at epoch {best_epoch}"),
    StageSpec("evaluate", "stage_evaluate", "full-ranking evaluation of the base model (metrics for DVC)",
              inputs=(Input("model_dir", "--model", "models/base", "model dir (or its best/)", model=True),
                      _PROCESSED),
              output="metrics/base.json", output_file=True, params=("eval", "preprocess.max_len"), kind="eval",
              metrics=("metrics/base.json",), summary="test ndcg@10 {test[ndcg@10]:.4f}"),
    StageSpec("train-reward", "stage_train_reward", "train the Bradley-Terry reward ensemble (reward.fold)",
              inputs=(_PROCESSED, _PREFS, _BASE), output="models/reward", params=_REWARD_PARAMS, training=True,
              distributed=True, progress=True, kind="train", summary="trained in {train_seconds:.0f} s"),
    StageSpec("reward-report", "stage_reward_report", "held-out accuracy, AUC, calibration, naive predictors",
              inputs=(Input("reward_dir", "--reward", "models/reward", "reward ensemble dir"), _PREFS, _PROCESSED,
                      _RAW, _BASE),
              output="reports/reward", params=("seed", "reward", "preprocess.max_len", "eval"), kind="eval",
              metrics=("reports/reward/reward_report.json",),
              summary="held-out accuracy {ensemble[pair_acc]:.4f}, AUC {ensemble[auc]:.4f}"),
    StageSpec("train-judge", "stage_train_judge", "train the held-out judge ensemble (other fold, other seeds)",
              inputs=(_PROCESSED, _PREFS, _BASE), output="models/judge", params=(*_REWARD_PARAMS, "judge"),
              training=True, distributed=True, progress=True, kind="train", summary="trained in {train_seconds:.0f} s"),
    StageSpec("sample", "stage_sample", "sample N candidates per training context from pi_ref",
              inputs=(_PROCESSED, _REF), output="candidates/sampled", params=("seed", "sampling"), distributed=True,
              progress=True, summary="{candidates} candidates for {contexts} contexts"),
    StageSpec("score", "stage_score", "score the sampled candidates with the reward ensemble",
              inputs=(Input("cand_dir", "--candidates", "candidates/sampled", "sampled candidates dir"), _PROCESSED,
                      _REF, _REWARD),
              output="candidates/scored", params=("sampling", "reward.kappa"), distributed=True, progress=True,
              summary="{candidates} candidates scored"),
    StageSpec("advantages", "stage_advantages", "A-SFT advantages and weights of the scored candidates",
              inputs=(_SCORED,), output="advantages", params=("advantage",),
              summary="ESS {ess_share:.1%} of {n:.0f}, {clipped_share:.2%} clipped"),
    StageSpec("posttrain", "stage_posttrain", "post-train pi_ref with one method (A-SFT or a baseline)",
              inputs=(_PROCESSED, _REF, replace(_REWARD, required=False), replace(_SCORED, required=False),
                      replace(_ADV, required=False)), output="models/posttrain/{method}",
              params=_POSTTRAIN_PARAMS,
              training=True, distributed=True, progress=True, options=("method",), foreach="posttrain.methods",
              kind="train", summary="{outcome}"),
    StageSpec("evaluate-policy", "stage_evaluate_policy", "section-7 report of one post-trained policy",
              inputs=(Input("model_dir", "--model", "models/posttrain/asft", "policy dir (or its best/)", model=True),
                      _REF, _PROCESSED, Input("reward_dir", "--reward", "models/reward", "reward ensemble dir",
                                              required=False),
                      Input("judge_dir", "--judge", "models/judge", "held-out judge dir", required=False),
                      Input("raw_dir", "--raw", "raw", "raw dir (its simulator/ adds the true reward)",
                            required=False)),
              output="reports/policy.json", output_file=True, params=("seed", "eval", "preprocess.max_len"),
              kind="eval", dvc=False, flow=False),
    StageSpec("evaluate-policies", "stage_evaluate_policies",
              "section-7 report of pi_ref and every post-trained policy on the same contexts",
              inputs=(Input("posttrain_dir", "--posttrain", "models/posttrain", "post-trained policies dir"), _REF,
                      _PROCESSED, _REWARD, _JUDGE, _RAW),
              output="reports/policies", params=("seed", "eval", "posttrain.lambda_sweep", "advantage.lam",
                                                 "preprocess.max_len", "reward.kappa"),
              kind="eval", metrics=("reports/policies/metrics.json",), cache=False,
              plots=({"reports/policies/methods.csv": {"x": "method", "y": ["ndcg@10", "judged_top10"]}},
                     {"models/base/history.csv": {"x": "epoch", "y": ["valid_ndcg@10"]}}),
              summary="{n_policies} policies evaluated"),
)

BY_NAME: dict[str, StageSpec] = {s.name: s for s in STAGES}


def get_stage(name: str) -> StageSpec:
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown stage '{name}'; stages: {', '.join(BY_NAME)}") from None


def flow_stages() -> list[StageSpec]:
    return [s for s in STAGES if s.flow]


def stage_params(spec: StageSpec, tree: dict[str, Any]) -> dict[str, Any]:
    """The values of the config keys ``spec`` reads, from ``cfg.to_dict()`` (its cache key's params)."""
    out = {}
    for key in spec.params:
        cur: Any = tree
        for part in key.split("."):
            cur = cur[part]
        out[key] = cur
    return out


def flat_params(spec: StageSpec, tree: dict[str, Any]) -> dict[str, Any]:
    """:func:`stage_params` as dotted leaves (for ``mlflow.log_params``)."""
    out: dict[str, Any] = {}

    def walk(prefix: str, v: Any) -> None:
        if isinstance(v, dict) and v:
            for k, x in v.items():
                walk(f"{prefix}.{k}", x)
        else:
            out[prefix] = v

    for k, v in stage_params(spec, tree).items():
        walk(k, v)
    return out


def summary_line(spec: StageSpec, summary: dict) -> str:
    """The stage's one-line console summary (empty when its summary lacks a field)."""
    try:
        return spec.summary.format_map(summary)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError):
        return ""


def call(spec: StageSpec, cfg, out_dir: str | Path | None, paths: dict[str, str | None],
         options: dict[str, Any] | None = None, **runtime: Any) -> dict:
    """Run the core function of ``spec`` with keyword arguments matched by name (``runtime``: on_log,
    resume, work_dir, progress, docs_dir; only those the function takes are passed)."""
    fn = spec.function
    accepted = inspect.signature(fn).parameters
    kwargs: dict[str, Any] = {"cfg": cfg, **paths, **(options or {})}
    if "out_dir" in accepted:
        kwargs["out_dir"] = out_dir
    kwargs.update({k: v for k, v in runtime.items() if k in accepted and v is not None})
    missing = [p.name for p in accepted.values() if p.default is inspect.Parameter.empty and p.name not in kwargs]
    if missing:
        raise TypeError(f"stage {spec.name}: missing arguments {missing}")
    return fn(**{k: v for k, v in kwargs.items() if k in accepted})


def cli_command(spec: StageSpec, paths: dict[str, str | None], out_dir: str | None,
                options: dict[str, Any] | None = None) -> list[str]:
    """The ``asft`` command line that runs ``spec`` on these paths (DVC ``cmd``, torchrun, subprocesses)."""
    cmd = [spec.name]
    for name in spec.options:
        cmd += [f"--{name}", str((options or {})[name])]
    for inp in spec.inputs:
        if paths.get(inp.arg):
            cmd += [inp.flag, str(paths[inp.arg])]
    if out_dir is not None:
        cmd += ["--output", str(out_dir)]
    return cmd


# ---- code dependencies from the real imports --------------------------------------------------------


def _module_file(name: str) -> Path | None:
    """The source file of a project module, found on disk (nothing is imported); None otherwise."""
    if not name or name.split(".")[0] not in PROJECT_PACKAGES:
        return None
    base = ROOT.joinpath(*name.split("."))
    for f in (base.with_suffix(".py"), base / "__init__.py"):
        if f.is_file():
            return f.resolve()
    return None


def _imports(tree: ast.AST, package: str) -> Iterator[str]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            yield base
            for a in node.names:  # ``from asft import stages`` imports a module
                yield f"{base}.{a.name}"



_SHALLOW = frozenset({"asft.stages", "asft.cli", "asft.pipeline"})


@cache
def _module_closure(name: str) -> frozenset[Path]:
    seen: set[Path] = set()
    todo = [(name, False)]
    while todo:
        mod, as_parent = todo.pop()
        f = _module_file(mod)
        if f is None or (f in seen and as_parent):
            continue
        expanded = f in seen
        seen.add(f)
        parents = mod.split(".")
        todo.extend((".".join(parents[:i]), True) for i in range(1, len(parents)))  # a submodule runs its
        pkg = mod if f.name == "__init__.py" else mod.rpartition(".")[0]            # packages' __init__
        tree = ast.parse(f.read_text())
        if (f.name == "__init__.py" and not as_parent and any(isinstance(n, ast.FunctionDef) and
                                                              n.name == "__getattr__" for n in tree.body)):
            # A lazy package used directly (names resolved on first use, builders registered by dotted
            # path): all of its modules.
            todo.extend((f"{mod}.{m.stem}", False) for m in f.parent.glob("*.py") if m.name != "__init__.py")
        if expanded:
            continue
        if mod in _SHALLOW:  # dispatchers: only what they import at module level (each stage adds its own)
            tree = ast.Module(body=[n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))],
                              type_ignores=[])
        todo.extend((n, False) for n in _imports(tree, pkg) if n.startswith(PROJECT_PACKAGES))
    return frozenset(seen)


def code_deps(spec: StageSpec) -> list[str]:
    """Project source files ``spec`` runs: the CLI entry point and the pipeline table, the module-level
    imports of :mod:`asft.stages`, and everything the stage function imports (transitively)."""
    stages_file = _module_file("asft.stages")
    tree = ast.parse(stages_file.read_text())
    funcs = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    module_level = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = {n for node in module_level for n in _imports(node, "asft")}
    todo, seen = [spec.func], set()
    while todo:  # the stage function and the asft.stages helpers it calls
        fn = funcs[todo.pop()]
        seen.add(fn.name)
        names |= set(_imports(fn, "asft"))
        todo.extend(c.func.id for c in ast.walk(fn) if isinstance(c, ast.Call) and isinstance(c.func, ast.Name)
                    and c.func.id in funcs and c.func.id not in seen)
    files: set[Path] = {stages_file, _module_file("asft.cli")}
    for node in ast.parse(_module_file("asft.cli").read_text()).body:  # the entry point's module-level imports
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= set(_imports(node, "asft"))
    for n in sorted(names):
        files |= _module_closure(n)
    return sorted(p.relative_to(ROOT).as_posix() for p in files)


# ---- dvc.yaml -------------------------------------------------------------------------------------------

DVC_DATA = "data"  # where the DVC pipeline keeps its run directory (relative to the repository)


def dvc_stages(methods: list[str]) -> dict[str, Any]:
    """The ``dvc.yaml`` document for the stages with ``dvc=True`` (run directory :data:`DVC_DATA`)."""
    stages: dict[str, Any] = {}
    outs_of: dict[str, str] = {}
    for spec in STAGES:
        if not spec.dvc:
            continue
        fmt = {"method": "${item}"} if spec.foreach else {}
        paths = spec.paths(DVC_DATA, **fmt)
        out = spec.output_path(DVC_DATA, **fmt)
        if spec.name == "evaluate-policies":
            paths["posttrain_dir"] = f"{DVC_DATA}/models/posttrain"
        options = {o: "${item}" for o in spec.options}
        cmd = "python -m asft.cli " + " ".join(cli_command(spec, paths, out, options))
        if spec.training:
            cmd += " --no-resume"
        if spec.docs:
            cmd += f" --docs {DVC_DATA}/{spec.docs}"
        entry: dict[str, Any] = {"cmd": cmd, "deps": code_deps(spec) + sorted(set(paths.values())),
                                 "params": list(spec.params)}
        if spec.output_file:  # the summary file is the stage's metrics (cached: run dirs are not in git)
            entry["metrics"] = [out]
        elif out:
            entry["outs"] = [out]
        if spec.foreach:
            stages[spec.name] = {"foreach": methods, "do": entry}
        else:
            stages[spec.name] = entry
        if out:
            outs_of[spec.name] = out
    # Metrics and plots inside output directories are declared at the top level (DVC 3).
    metrics = [f"{DVC_DATA}/{m}" for spec in STAGES if spec.dvc and not spec.output_file for m in spec.metrics]
    plots = [{f"{DVC_DATA}/{f}": v} for spec in STAGES for p in spec.plots for f, v in p.items()]
    return {"stages": stages, "metrics": metrics, "plots": plots}


DVC_HEADER = """\
# GENERATED from asft/pipeline.py (STAGES) by `asft dvc-yaml`; do not edit by hand: a test fails when this
# file differs from the declaration. Each stage is an `asft` CLI stage command reading params.yaml; `params:`
# are the config keys the stage declares, `deps:` the project modules it really imports and its input data.
# Run with the project's virtual environment active (`source .venv/bin/activate`). Outputs are cached in
# .dvc/cache and pushed to the default remote (README, "Data versioning (DVC)").
"""


def render_dvc_yaml(methods: list[str]) -> str:
    import yaml

    return DVC_HEADER + yaml.safe_dump(dvc_stages(methods), sort_keys=False, width=120)


@dataclass
class StageRun:
    """A stage instance in a run directory: the spec, its inputs and output, and its option values."""

    spec: StageSpec
    paths: dict[str, str | None]
    out_dir: str | None
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return "-".join([self.spec.name, *map(str, self.options.values())])
