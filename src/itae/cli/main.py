"""``itae``: the command line, a thin layer over the Python API.

  itae run DATA -k K -o OUT       embed, cluster, score and report in one go
  itae embed DATA -o STORE        embeddings only (--method itae by default; none, ttr, itae+ttr)
  itae cluster STORE -k K -o OUT  cluster a finished embedding store
  itae evaluate OUT               score OUT/assignments.csv against its labels
  itae inspect IMAGE... -o OUT    artifact diagnostics figures
  itae assign NEW --clusters OUT -o OUT2   put new images into the clusters of a run
  itae check STORE -o OUT         near-duplicates, outliers and likely mislabels of a collection
  itae compare OUT_A OUT_B -o OUT two runs side by side (e.g. ITAE against --no-itae)
  itae bench --paper -o OUT       the paper's benchmark grid (--quick: the offline demo; --spec: your own)

A user's error (an ``ItaeError`` or an ``OSError``) is one readable line on stderr and exit code 2, with
the library's parameter names written as this command line's flags. Anything else is a bug: its traceback
and a line asking to report it, exit code 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import traceback
from pathlib import Path
from typing import Any

from itae.config import FEATURES, PRECISION_NAMES
from itae.data.sources import LABEL_MODES
from itae.errors import ConfigError, ItaeError

EXIT_BUG = 1
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130

# The one table from the library's parameter names to the flags that set them. Library messages name
# parameters ("lower batch_size", "pass overwrite=True"); errors and warnings are printed with the flags
# instead ("lower --batch-size", "pass --overwrite"): see with_flags().
PARAMETER_FLAGS = {
    "arch": "--arch",
    "batch_size": "--batch-size",
    "clusters": "--clusters",
    "common": "--common",
    "data": "--data",
    "data_root": "--data-root",
    "device": "--device",
    "dup_threshold": "--dup-threshold",
    "hf_config": "--hf-config",
    "k_range": "--k-range",
    "labels": "--labels",
    "max_samples": "--max-samples",
    "model": "--model",
    "model_root": "--model-root",
    "neighbours": "--neighbours",
    "out": "-o",
    "outlier_z": "--outlier-z",
    "overwrite": "--overwrite",
    "precision": "--precision",
    "split": "--split",
}
_QUOTES = "'\""
# name=True -> the flag alone; name=None -> "no" and the flag; name='value', name=value or name=... -> the flag
# and the value; a bare name that has an underscore (batch_size) -> the flag. Never inside a word, a path, a
# quote or an attribute (ITAEConfig.x), nor a keyword argument of a Python call shown in a message ("f(a, x=1)").
_PARAMETER = re.compile(
    r"(?<![\w./\\'\"-])(?<!\()(?<!, )(" + "|".join(sorted(PARAMETER_FLAGS, key=len, reverse=True)) + r")"
    r"(?:=(True\b|None\b|'[^']*'|\"[^\"]*\"|[^\s,;)]+)|(?![\w(=/\\'\"-]))"
)


def with_flags(text: str) -> str:
    """``text`` with the library's parameter names replaced by the flags of PARAMETER_FLAGS."""

    def flag(m: re.Match) -> str:
        name, value = m.group(1), m.group(2)
        if value is None:
            return PARAMETER_FLAGS[name] if "_" in name else name
        if value in ("True", "None"):
            return PARAMETER_FLAGS[name] if value == "True" else f"no {PARAMETER_FLAGS[name]}"
        return f"{PARAMETER_FLAGS[name]} {value.strip(_QUOTES)}"

    return _PARAMETER.sub(flag, text)

# Options whose value may be a comma list of negative numbers ("--layers -2,-1"): argparse would take
# "-2,-1" for an option, so main() joins such pairs into "--layers=-2,-1" before parsing.
NUMBER_LIST_OPTIONS = ("--layers", "--threshold", "--seeds")
_NUMBER = r"-?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_NUMBER_LIST = re.compile(rf"\s*{_NUMBER}\s*(?:,\s*{_NUMBER}\s*)*,?")


def join_number_lists(argv: list[str]) -> list[str]:
    """``--layers -2,-1`` -> ``--layers=-2,-1`` (and likewise for the other NUMBER_LIST_OPTIONS)."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        if token == "--":  # everything after it is positional
            out.extend(argv[i:])
            break
        value = argv[i + 1] if i + 1 < len(argv) else None
        if (token in NUMBER_LIST_OPTIONS and value is not None and value.startswith("-")
                and _NUMBER_LIST.fullmatch(value)):
            out.append(f"{token}={value}")
            i += 2
            continue
        out.append(token)
        i += 1
    return out


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.replace(" ", "").split(",") if v != "")
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers; got {text!r}") from None


def _threshold(text: str):
    if text == "auto":
        return "auto"
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"threshold must be 'auto', a number or comma-separated numbers; got {text!r}") from None
    return values[0] if len(values) == 1 else values


def _k_range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(":")
    try:
        return int(lo), int(hi)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--k-range must look like 2:20; got {text!r}") from None


# ------------------------------------------------------------------------------------- options


def _add_model(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", "-m", default="facebook/dinov2-base",
                   help="HF id, timm name, hub name (dinov2_vitb14) or local path (default: %(default)s)")
    g.add_argument("--arch", help="architecture of a bare .safetensors/.pth checkpoint (e.g. dinov2_vitb14)")
    g.add_argument("--device", default="auto", help="auto, cuda, mps or cpu (default: %(default)s)")
    g.add_argument("--precision", choices=PRECISION_NAMES, default="fp32",
                   help="model weights dtype; fp8: bf16 with FP8 matrix products (Ada/Hopper GPUs, approximate)")
    g.add_argument("--resolution", type=int, help="input size, rounded to the patch size (default: the model's)")


FIXES = ("none", "itae", "ttr", "itae+ttr")
ALGORITHMS = ("kmeans", "agglomerative", "hdbscan")


def _add_method(p: argparse.ArgumentParser, *, clustering_too: bool) -> None:
    g = p.add_argument_group("artifact fix")
    old = " (kmeans, agglomerative, hdbscan: deprecated, use --algorithm)" if clustering_too else ""
    g.add_argument("--method", metavar="{" + ",".join(FIXES) + "}",
                   help="none: the unmodified model; itae (default); ttr: test-time registers; itae+ttr: both" + old)
    g.add_argument("--no-itae", action="store_true", help="the same as --method none")
    t = p.add_argument_group("test-time registers (--method ttr or itae+ttr; defaults: the published DINOv2-L values)")
    t.add_argument("--ttr-outlier-layer", type=int, default=-2, help="block whose output norms define outliers")
    t.add_argument("--ttr-norm-threshold", type=_norm_threshold, default=150.0,
                   help="outlier residual norm: a number or 'auto' (split at the histogram valley)")
    t.add_argument("--ttr-max-layer", type=int, default=17, help="last block whose MLP neurons may be chosen")
    t.add_argument("--ttr-top-k", type=int, default=50, help="number of register neurons")
    t.add_argument("--ttr-keep-prefix", action="store_true",
                   help="keep the register neurons at the CLS/register tokens (default: zero them there too)")


def _norm_threshold(text: str):
    if text == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto'; got {text!r}") from None


def _resolve_method(args: argparse.Namespace) -> None:
    """Set ``args.fix`` (the artifact fix) and ``args.algorithm`` (clustering) from --method, --no-itae and
    --algorithm. The value sets are disjoint, so an old ``--method kmeans`` still means the algorithm."""
    method = getattr(args, "method", None)
    if method in ALGORITHMS:
        if "algorithm" not in args:
            raise ConfigError(f"--method {method} names a clustering algorithm; this command does not cluster")
        logging.getLogger("itae").warning(
            "itae: warning: --method %s for the clustering algorithm is deprecated; use --algorithm %s", method, method)
        if args.algorithm not in (None, method):
            raise ConfigError(f"--method {method} and --algorithm {args.algorithm} disagree")
        args.algorithm, method = method, None
    if "algorithm" in args and args.algorithm is None:
        args.algorithm = "kmeans"
    if method is not None and method not in FIXES:
        choices = FIXES + (ALGORITHMS if "algorithm" in args else ())
        raise ConfigError(f"--method must be one of {', '.join(choices)}; got {method!r}")
    if getattr(args, "no_itae", False):
        if method not in (None, "none"):
            raise ConfigError(f"--no-itae and --method {method} disagree (--no-itae means --method none)")
        method = "none"
    if "no_itae" in args:
        args.fix = method or "itae"


def _ttr_config(args: argparse.Namespace):
    from itae.methods import TTRConfig, method_uses

    if not method_uses(args.fix)[1]:
        return None
    return TTRConfig(outlier_layer=args.ttr_outlier_layer, norm_threshold=args.ttr_norm_threshold,
                     max_layer=args.ttr_max_layer, top_k=args.ttr_top_k, zero_prefix=not args.ttr_keep_prefix)


def _add_itae(p: argparse.ArgumentParser, *, baseline: bool = True) -> None:
    g = p.add_argument_group("ITAE (--method itae or itae+ttr)" if baseline else "ITAE")
    g.add_argument("--source", choices=["auto", "q", "k", "v"], default="auto",
                   help="projection whose patch norms flag artifacts; auto (default): chosen on the data, label-free")
    g.add_argument("--threshold", type=_threshold, default="auto",
                   help="'auto' (calibrated on the data, label-free), a number, or one per layer")
    g.add_argument("--side", choices=["auto", "low", "high"], default="auto",
                   help="flag norms at or below / above the threshold; auto (default): chosen with the source")
    g.add_argument("--layers", type=_int_list, default=(-1,), help="blocks to engineer, e.g. -1 or -2,-1")
    g.add_argument("--rows", choices=["cls", "all"], default="cls", help="query rows engineered")
    g.add_argument("--mode", choices=["min", "mask", "scale"], default="min", help="how artifact logits change")
    g.add_argument("--alpha", type=float, default=0.1, help="factor for --mode scale")
    g.add_argument("--granularity", choices=["token", "head"], default="token", help="norm over all heads or per head")
    g.add_argument("--calibration", choices=["mode", "otsu", "gmm"], default="mode", help="how 'auto' splits the norms: mode (a rare mode beyond the bulk), or 0.1.0's otsu/gmm")
    g.add_argument("--calibration-images", type=int, default=512, help="images used to calibrate 'auto'")


def _add_data(p: argparse.ArgumentParser, *, labels_default: str = "none") -> None:
    g = p.add_argument_group("images")
    g.add_argument("--labels", choices=LABEL_MODES, default=labels_default,
                   help="where labels come from (default: %(default)s)")
    g.add_argument("--split", help="split of a HF data set")
    g.add_argument("--hf-config", help="configuration of a HF hub data set, e.g. 320px for frgfm/imagenette "
                   "(or write DATA as hf:owner/name:CONFIG)")
    g.add_argument("--image-column", default="image", help="image column of a HF data set")
    g.add_argument("--label-column", default="label", help="label column of a HF data set or CSV list")


def _add_embedding(p: argparse.ArgumentParser, *, clustering_too: bool) -> None:
    """Everything a command that embeds takes (run, embed): model, method, ITAE, data source, embedding."""
    _add_model(p)
    _add_method(p, clustering_too=clustering_too)
    _add_itae(p)
    _add_data(p)
    _add_embed(p)


def _add_embed(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("embedding")
    g.add_argument("--feature", choices=FEATURES, default="cls", help="what to keep per image")
    g.add_argument("--normalize", action="store_true", help="L2-normalise embeddings")
    g.add_argument("--batch-size", type=int, default=64)
    g.add_argument("--workers", type=int, help="decoding workers (default: spare cores, at most 32 with a GPU, 8 without)")
    g.add_argument("--fast-decode", action="store_true",
                   help="decode large JPEGs at 1/2-1/8 scale (2-6x faster for photos; pixels differ slightly)")
    g.add_argument("--compile", action="store_true", help="compile the model's blocks with torch.compile (GPU runs)")
    g.add_argument("--overwrite", action="store_true", help="start afresh instead of resuming an existing store")
    g.add_argument("--save-every", type=int, default=4096, metavar="N",
                   help="commit embedding progress every N images, and at least every 30 s (local engine; default: %(default)s)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_cluster(p: argparse.ArgumentParser, *, k_required: bool = False) -> None:
    g = p.add_argument_group("clustering")
    g.add_argument("-k", "--k", type=int, required=k_required,
                   help="number of clusters (omit to choose it automatically, see --criterion)")
    g.add_argument("--algorithm", choices=ALGORITHMS, help="clustering algorithm (default: kmeans)")
    g.add_argument("--backend", choices=["auto", "sklearn", "minibatch", "faiss"],
                   help="k-means implementation (default auto: scikit-learn up to 50,000 images, then faiss if "
                        "installed, else mini-batch)")
    g.add_argument("--criterion", choices=["silhouette", "calinski_harabasz", "davies_bouldin"],
                   help="how k is chosen when -k is omitted (default: silhouette)")
    g.add_argument("--seeds", type=_int_list, default=(0,), help="k-means seeds, e.g. 0,1,2 (scores: mean and std)")
    g.add_argument("--spherical", action="store_true", help="cosine k-means on normalised embeddings")
    g.add_argument("--k-range", type=_k_range, default=(2, 20), help="range for automatic k, e.g. 2:20")
    g.add_argument("--max-samples", type=int,
                   help="largest input agglomerative / HDBSCAN accept (default 20,000 / 10,000: they need all "
                        "pairwise distances)")


def _cluster_options(args: argparse.Namespace) -> dict:
    if args.k is not None and args.algorithm == "hdbscan":
        raise ConfigError("--algorithm hdbscan chooses the number of clusters itself; omit -k")
    options: dict = {"k_range": args.k_range} if args.k is None else {}
    if args.max_samples is not None:
        if args.algorithm == "kmeans":
            raise ConfigError("--max-samples applies to --algorithm agglomerative and hdbscan; k-means has no size limit")
        options["max_samples"] = args.max_samples
    if args.backend is not None:
        if args.algorithm != "kmeans":
            raise ConfigError(f"--backend applies to --algorithm kmeans, not {args.algorithm}")
        from itae.clustering import resolve_backend

        resolve_backend(args.backend, 0)  # refuses faiss when it is not installed, before any image is read
        options["backend"] = args.backend
    if args.criterion is not None:
        if args.k is not None or args.algorithm == "hdbscan":
            raise ConfigError("--criterion chooses k when -k is omitted; it does not apply with -k or "
                              "--algorithm hdbscan")
        options["criterion"] = args.criterion
    return options


def _itae_config(args: argparse.Namespace):
    from itae.config import ITAEConfig

    if getattr(args, "fix", "itae") in ("none", "ttr"):
        return None
    if args.threshold != "auto" and "auto" in (args.source, args.side):
        raise ConfigError("a numeric --threshold needs a fixed --source and --side (e.g. --source v --side low, as "
                          "published); or leave --threshold auto")
    return ITAEConfig(
        source=args.source, threshold=args.threshold, side=args.side, layers=tuple(args.layers), rows=args.rows,
        mode=args.mode, alpha=args.alpha, granularity=args.granularity, calibration=args.calibration,
    )


def _configure_logging(verbose: bool, loads_models: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s", stream=sys.stderr)
    if loads_models and not verbose:
        # the hub libraries' own weight-loading bars would bury our single progress bar and error line
        try:
            from huggingface_hub.utils import disable_progress_bars

            disable_progress_bars()
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
            hf_logging.set_verbosity_error()
        except ImportError:
            pass


# ------------------------------------------------------------------------------------ commands


def cmd_embed(args: argparse.Namespace) -> int:
    from itae._lock import folder_lock
    from itae.data.store import prepare_output

    _resolve_method(args)
    cfg = _itae_config(args)
    with folder_lock(prepare_output(args.out), "itae embed"):  # one writer per store
        store = _embed(args, cfg)
    print(_store_summary(store))
    print(_store_check_line(store))
    return 0


def _specs(args: argparse.Namespace):
    """The source, model and embedding specs of the command line, built once."""
    from itae.data.spec import SourceSpec
    from itae.extraction.options import EmbedOptions
    from itae.models.spec import ModelSpec

    source = SourceSpec(args.data, split=args.split, image_column=args.image_column,
                        label_column=args.label_column, config=args.hf_config, labels=args.labels)
    model = ModelSpec(args.model, arch=args.arch, device=args.device, precision=args.precision,
                      resolution=args.resolution)
    options = EmbedOptions(feature=args.feature, normalize=args.normalize, batch_size=args.batch_size,
                           num_workers=args.workers, calibration_images=args.calibration_images,
                           fast_decode=args.fast_decode, compile=args.compile, save_every=args.save_every)
    return source, model, options


def _embed(args: argparse.Namespace, cfg):
    source, model, options = _specs(args)
    if args.engine == "ray":
        from itae.distributed import embed_ray

        if args.fix in ("ttr", "itae+ttr"):
            raise ConfigError(f"--method {args.fix}: test-time registers run with --engine local only")

        return embed_ray(
            source, model, out=args.out, itae=cfg, options=options, address=args.ray_address,
            num_actors=args.ray_actors, num_gpus_per_actor=args.ray_gpus_per_actor, num_decoders=args.ray_decoders,
            overwrite=args.overwrite, progress=not args.no_progress,
        )
    from itae.extraction.local import embed

    return embed(source, model, out=args.out, itae=cfg, ttr=_ttr_config(args), options=options,
                 progress=not args.no_progress, overwrite=args.overwrite)


def _store_check_line(store) -> str:
    """The ITAE line of ``itae embed``: the calibration's self-check, or what the store was made with."""
    from itae.pipeline import self_check_line

    cfg = store.itae_config
    if cfg is None:
        return "ITAE off: the unmodified model (baseline)"
    check = (store.manifest.get("calibration") or {}).get("self_check")
    if check is None:
        return (f"ITAE on with fixed threshold(s) {cfg.threshold} ({cfg.source}/{cfg.side}); not checked here "
                "(itae run and itae inspect check what they flag)")
    return self_check_line({**check, "status": "flagging" if check["flagged"] else "nothing flagged"})


def _store_summary(store) -> str:
    """What a store holds, true whether this command filled it, finished it or found it complete."""
    line = f"store {store.path}: {len(store)} images embedded"
    n_failed = len(store.errors)
    if n_failed:
        line += f", {n_failed} could not be decoded (listed in errors.csv)"
    return line


def _plus_minus() -> str:
    encoding = getattr(sys.stdout, "encoding", None) or "ascii"
    try:
        "\u00b1".encode(encoding)
    except (LookupError, UnicodeEncodeError):
        return "+/-"
    return "\u00b1"


def _run_summary(record: dict[str, Any]) -> str:
    """``itae run``'s result line: images, clusters, scores (naming the seed they are of), decoding failures."""
    line = f"{record['n_images']} images -> {record['clustering']['k']} clusters"
    n_errors = record.get("n_errors") or 0
    if n_errors:
        line += f" ({n_errors} more could not be decoded, see errors.csv)"
    m = record["metrics"]
    if m:
        scores = ("acc", "nmi", "ari")
        first = "  ".join(f"{s.upper()} {100 * m[s]:.2f}" for s in scores)
        seeds = record["clustering"].get("seeds") or [0]
        if "mean" in m:  # several seeds: the headline scores are those of the first one
            pm = _plus_minus()
            mean = "  ".join(f"{s.upper()} {100 * m['mean'][s]:.2f} {pm} {100 * m['std'][s]:.2f}" for s in scores)
            line += f"; seed {seeds[0]}: {first}; mean over {m.get('n_runs', len(seeds))} seeds: {mean}"
        else:
            line += f"; {first}"
    return line


def cmd_cluster(args: argparse.Namespace) -> int:
    from itae.pipeline import cluster_store

    _resolve_method(args)
    result = cluster_store(args.store, args.k, out=args.out or args.store, method=args.algorithm, seeds=args.seeds,
                           spherical=args.spherical, **_cluster_options(args))
    print(f"{result.k} clusters; assignments in {Path(args.out or args.store) / 'assignments.csv'}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from itae.pipeline import evaluate_assignments

    metrics = evaluate_assignments(args.assignments)
    # metrics.json as written, less the per-seed details ("seeds") that only the file holds
    print(json.dumps({k: v for k, v in metrics.items() if k != "seeds"}, indent=2))
    return 0


def cmd_assign(args: argparse.Namespace) -> int:
    from itae.collection.assign import assign

    record = assign(
        args.data, args.clusters, args.out, model=args.model, arch=args.arch, device=args.device,
        batch_size=args.batch_size, num_workers=args.workers, labels=args.labels, split=args.split,
        hf_config=args.hf_config, image_column=args.image_column, label_column=args.label_column,
        progress=not args.no_progress, overwrite=args.overwrite,
    )
    line = f"{record['n_images']} images assigned to the clusters of {args.clusters}"
    if record["n_errors"]:
        line += f" ({record['n_errors']} more could not be decoded, see errors.csv)"
    print(line)
    print(f"assignments in {Path(args.out) / 'assignments.csv'}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from itae.collection.check import check

    result = check(args.store, args.out, assignments=args.assignments, dup_threshold=args.dup_threshold,
                   neighbours=args.neighbours, outlier_z=args.outlier_z, backend=args.knn_backend, data=args.data,
                   html=not args.no_html, progress=not args.no_progress)
    s = result.summary

    def count(n: int, noun: str) -> str:
        return f"{n} {noun}" + ("" if n == 1 else "s")

    line = (f"{s['n_images']} images: {count(s['duplicates']['groups'], 'near-duplicate group')} "
            f"({s['duplicates']['images']} images), {count(s['outliers']['images'], 'outlier')}")
    line += ", no labels to check" if result.mislabels is None else f", {count(len(result.mislabels), 'likely mislabel')}"
    print(line)
    print(f"results in {args.out}" + ("" if args.no_html else f" (open {Path(args.out) / 'check.html'})"))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from itae.collection.compare import compare

    s = compare(args.run_a, args.run_b, args.out, common=args.common, data=args.data, max_changed=args.max_images)
    line = f"{s['n_images']} images, {s['n_changed']} changed cluster ({100 * s['agreement']['matched']:.2f}% agree)"
    if s["metrics"]:
        d = s["metrics"]["b_minus_a"]
        line += "; B - A: " + "  ".join(f"{k.upper()} {100 * d[k]:+.2f}" for k in ("acc", "nmi", "ari"))
    print(line)
    page = Path(args.out) if Path(args.out).suffix.lower() in (".html", ".htm") else Path(args.out) / "compare.html"
    print(f"open {page}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from itae.pipeline import run

    _resolve_method(args)
    source, model, options = _specs(args)
    record = run(
        source, args.k, args.out, model=model, itae=_itae_config(args), method=args.fix, ttr=_ttr_config(args),
        options=options, algorithm=args.algorithm, seeds=args.seeds, spherical=args.spherical,
        report=not args.no_report, progress=not args.no_progress, overwrite=args.overwrite,
        cluster_options=_cluster_options(args), title=args.title,
    )
    print(_run_summary(record))
    from itae.pipeline import self_check_line

    print(self_check_line(record["self_check"]))
    print(f"outputs in {args.out}" + ("" if args.no_report else f" (open {Path(args.out) / 'report.html'})"))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from itae.diagnostics import write_diagnostics
    from itae.models.loading import load_backbone
    from itae.models.spec import resolve_device

    cfg = _itae_config(args)
    backbone = load_backbone(args.model, arch=args.arch, device=resolve_device(args.device), resolution=args.resolution)
    drawn = write_diagnostics(backbone, args.images, args.out, itae=cfg)  # draws the images it can read
    for p, reason in drawn.failed:
        print(f"itae: cannot inspect {p!r}: {reason}", file=sys.stderr)
    for line in drawn.check_lines(chosen="auto" if cfg.is_auto else "fixed"):
        print(line)
    print(f"{len(drawn.figures)} figures for {len(drawn.names)} image(s) in {args.out}")
    if drawn.failed:
        print(f"itae: error: {len(drawn.failed)} of {len(args.images)} image(s) could not be inspected (listed above); "
              "the others were drawn", file=sys.stderr)
        return EXIT_ERROR
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from itae.bench import preset_spec, run_bench

    chosen = [name for name, on in (("--spec", args.spec), ("--quick", args.quick),
                                    ("--paper/--preset", args.paper or args.preset)) if on]
    if len(chosen) > 1:
        raise ConfigError(f"give one of --spec, --quick and --paper/--preset; got {' and '.join(chosen)}")
    run = {"progress": not args.no_progress, "keep_going": args.keep_going, "report": not args.no_report,
           "title": args.title}
    if args.quick:
        data = args.data
        if data is None:  # nothing given: generated labelled images, so the preset runs anywhere
            from itae.bench.synthetic import make_shapes

            data = make_shapes(Path(args.out) / "quick-images")
        results = run_bench(data, args.out, quick=True, **run)
    elif args.spec:
        results = run_bench(args.spec, args.out, **run)
    elif args.paper or args.preset:
        overrides = {k: getattr(args, k) for k in ("device", "batch_size", "calibration_images") if getattr(args, k)}
        if args.workers is not None:
            overrides["num_workers"] = args.workers
        spec = preset_spec(args.preset or "paper", models=args.models, datasets=args.datasets,
                           data_root=args.data_root, model_root=args.model_root, max_images=args.max_images,
                           **({"seeds": args.seeds} if args.seeds else {}), **overrides)
        results = run_bench(spec, args.out, **run)
    else:
        raise ConfigError("give --paper (the paper's grid), --preset mteb, a grid spec (--spec grid.json) or --quick")
    print(results.markdown())
    missing = f", {len(results.missing)} cell(s) missing" if results.missing else ""
    print(f"{results.ran} runs done, {results.skipped} already there{missing}; results in {results.md_path}")
    return 0


# -------------------------------------------------------------------------------------- parser


def _add_global(p: argparse.ArgumentParser, *, suppress: bool = False) -> None:
    """-v, --config, --traceback; with ``suppress`` (on the subcommands) an absent flag sets nothing."""
    g = p.add_argument_group("general")
    off = argparse.SUPPRESS if suppress else False
    g.add_argument("-v", "--verbose", action="store_true", default=off, help="log calibration and progress details")
    g.add_argument("--config", default=argparse.SUPPRESS if suppress else None,
                   help="a JSON/TOML file of option defaults (command-line flags win)")
    g.add_argument("--traceback", action="store_true", default=off, help="show the full traceback of an error")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="itae",
        description="Cluster images with DINOv2 embeddings improved by Inference-Time Attention Engineering (ITAE).",
        epilog="Every option can also come from --config FILE (JSON, or TOML on Python 3.11+), keys as option names.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__import__('itae').__version__}")
    _add_global(parser)
    # The same flags after the subcommand ("itae run ... -v"). Their default is SUPPRESS there, so a flag
    # not given after the subcommand leaves the value given (or defaulted) before it.
    common = argparse.ArgumentParser(add_help=False)
    _add_global(common, suppress=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("run", help="embed, cluster, score and report", description="Embed DATA, cluster it into K "
                       "groups, score against labels when known, and write OUT/ (assignments.csv, metrics.json, "
                       "errors.csv, run.json, report.html, embeddings/).", parents=[common])
    p.add_argument("data", help="folder, .txt/.csv list, WebDataset .tar shards, or HF data set (id or saved folder)")
    p.add_argument("-o", "--out", required=True, help="output folder")
    p.add_argument("--no-report", action="store_true", help="skip report.html")
    p.add_argument("--title", help="title of report.html (default: 'itae run: ' and the data's name)")
    _add_cluster(p)
    _add_embedding(p, clustering_too=True)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("embed", help="embed images into a resumable store", parents=[common])
    p.add_argument("data", help="folder, .txt/.csv list, WebDataset .tar shards, or HF data set")
    p.add_argument("-o", "--out", required=True, help="store folder")
    p.add_argument("--engine", choices=["local", "ray"], default="local", help="local process or Ray Data")
    p.add_argument("--ray-address", help="Ray cluster address (default: start a local Ray instance)")
    p.add_argument("--ray-actors", type=int, default=1, help="model replicas (one per GPU)")
    p.add_argument("--ray-gpus-per-actor", type=float,
                   help="GPUs per model replica (default: 1 when the cluster has GPUs, else 0)")
    p.add_argument("--ray-decoders", type=int,
                   help="CPU decoding actors (0: decode inside the model actors; default: autoscale with GPU "
                        "replicas, 0 with CPU ones)")
    _add_embedding(p, clustering_too=False)
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("cluster", help="cluster a finished embedding store", parents=[common])
    p.add_argument("store", help="store folder written by itae embed")
    p.add_argument("-o", "--out", help="where assignments.csv goes (default: the store folder)")
    p.add_argument("--method", choices=ALGORITHMS, help=argparse.SUPPRESS)  # deprecated: --algorithm
    _add_cluster(p)
    p.set_defaults(func=cmd_cluster)

    p = sub.add_parser("evaluate", help="score assignments.csv against its labels", parents=[common])
    p.add_argument("assignments", help="assignments.csv, or the folder holding it")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("inspect", help="figures of the artifacts and of the CLS attention before/after ITAE",
                       parents=[common])
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("-o", "--out", required=True, help="folder for the PNG figures")
    _add_model(p)
    _add_itae(p, baseline=False)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("assign", help="put new images into the clusters of a run", parents=[common],
                       description="Embed NEW_DATA exactly as the reference run's store was embedded (model, "
                       "precision, preprocessing, feature, ITAE with its calibrated thresholds) and give each "
                       "image the cluster of the nearest saved centroid. Writes OUT2/assignments.csv (path, "
                       "cluster, label, distance), OUT2/errors.csv, OUT2/assign.json and OUT2/embeddings/.")
    p.add_argument("data", help="new images: folder, .txt/.csv list, WebDataset .tar shards, or HF data set")
    p.add_argument("--clusters", required=True, help="output folder of itae run or itae cluster")
    p.add_argument("-o", "--out", required=True, help="output folder")
    g = p.add_argument_group("model")
    g.add_argument("--model", "-m", help="optional: must name the reference store's model, which is used")
    g.add_argument("--arch", help="architecture of a bare .safetensors/.pth checkpoint")
    g.add_argument("--device", default="auto", help="auto, cuda, mps or cpu (default: %(default)s)")
    _add_data(p)
    g = p.add_argument_group("embedding")
    g.add_argument("--batch-size", type=int, default=64)
    g.add_argument("--workers", type=int, help="decoding workers")
    g.add_argument("--overwrite", action="store_true", help="start afresh instead of resuming OUT2/embeddings")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_assign)

    p = sub.add_parser("check", help="near-duplicates, outliers and likely mislabels of a collection",
                       parents=[common], description="Exact k nearest neighbours (cosine) of every image of a "
                       "store; writes OUT/duplicates.csv, outliers.csv, mislabels.csv (with labels), check.json "
                       "and check.html.")
    p.add_argument("store", help="embedding store (itae embed) or run folder (itae run)")
    p.add_argument("-o", "--out", required=True, help="output folder")
    p.add_argument("--assignments", help="assignments.csv (or its folder) with the clusters and labels to check "
                   "(default: the run's own, for a run folder)")
    p.add_argument("--dup-threshold", type=float, default=0.04,
                   help="cosine distance at or under which neighbours are near-duplicates (default: %(default)s, "
                        "i.e. cosine similarity 0.96)")
    p.add_argument("--neighbours", type=int, default=10, help="neighbours per image (default: %(default)s)")
    p.add_argument("--outlier-z", type=float, default=3.5,
                   help="robust z-score of the mean neighbour distance at which an image is an outlier "
                        "(default: %(default)s)")
    p.add_argument("--knn-backend", choices=["auto", "faiss", "sklearn"], default="auto",
                   help="exact kNN by scikit-learn or faiss (default auto: scikit-learn, measured faster on a 2-core CPU)")
    p.add_argument("--data", help="where the images are, for the thumbnails (default: the store's source)")
    p.add_argument("--no-html", action="store_true", help="CSV and JSON only")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("compare", help="two runs side by side: metrics, change per class, changed images",
                       parents=[common], description="Compare two runs over the same images (e.g. ITAE against "
                       "--no-itae). OUT ending in .html is the page alone; otherwise a folder with compare.html, "
                       "changed.csv and compare.json.")
    p.add_argument("run_a", help="run A: folder of itae run / itae cluster, or its assignments.csv")
    p.add_argument("run_b", help="run B: likewise")
    p.add_argument("-o", "--out", required=True, help="page (.html) or output folder")
    p.add_argument("--common", action="store_true", help="runs over different images: compare on the shared ones")
    p.add_argument("--data", help="where the images are, for the thumbnails (default: the runs' store source)")
    p.add_argument("--max-images", type=int, default=200, help="changed images shown on the page (default: %(default)s)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("bench", help="benchmark grid: data sets x models x methods x seeds", parents=[common],
                       description="Run a benchmark grid into OUT (results.csv, results.md, report.html). A grid "
                       "that stops resumes where it stopped when run again with the same OUT.")
    p.add_argument("--paper", action="store_true",
                   help="the paper's grid: CIFAR-10, CIFAR-100, STL-10, Tiny-ImageNet x DINOv2 S/B/L/g x baseline, "
                        "ITAE, registers; k-means, several seeds; the published figures beside ours")
    p.add_argument("--preset", choices=["paper", "mteb"],
                   help="paper (as --paper) or mteb: MTEB's image-clustering protocol (MiniBatchKMeans, batch 500) "
                        "on MTEB's data sets, beside MTEB's published DINOv2 numbers")
    p.add_argument("--models", help="preset models: sizes s,b,l,g (default: all four) or model names")
    p.add_argument("--datasets", help="preset data sets, e.g. cifar10,stl10 (default: all of the preset's)")
    p.add_argument("--seeds", type=_int_list, help="k-means seeds of a preset (default: 0,1,2,3,4)")
    p.add_argument("--data-root", help="folder of local data set copies: NAME is read from DATA_ROOT/NAME (a "
                   "save_to_disk folder) when it exists, else from the HF hub")
    p.add_argument("--model-root", help="folder of local model copies: facebook/dinov2-base is read from "
                   "MODEL_ROOT/dinov2-base (a save_pretrained folder) when it exists, else from the HF hub")
    p.add_argument("--max-images", type=int, help="a class-balanced subset of each data set (a smoke run; the "
                   "published figures are for the whole split)")
    p.add_argument("--keep-going", action="store_true",
                   help="a data set or model that cannot be loaded: report it, mark its cells missing, go on")
    p.add_argument("--device", help="auto, cuda, mps or cpu (preset; default: auto)")
    p.add_argument("--batch-size", type=int, help="images per forward pass (preset; default: 64)")
    p.add_argument("--workers", type=int, help="decoding processes (preset)")
    p.add_argument("--calibration-images", type=int, help="images used to calibrate ITAE's threshold (preset; default: 512)")
    p.add_argument("--spec", help="grid spec (JSON)")
    p.add_argument("--quick", action="store_true", help="offline preset: the planted-artifact demo on a local folder")
    p.add_argument("--data", help="labelled image folder (<class>/<image>) for --quick (default: generated images)")
    p.add_argument("-o", "--out", required=True, help="output folder (results.csv, results.md, report.html)")
    p.add_argument("--no-report", action="store_true", help="skip report.html")
    p.add_argument("--title", help="title of report.html (default: 'itae bench: ' and the data sets' names)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_bench)
    return parser


def _load_config_file(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file {path!r} not found")
    text = p.read_text(encoding="utf-8")
    if p.suffix.lower() == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10
            raise ConfigError("TOML config files need Python 3.11+; use JSON") from None
        data = tomllib.loads(text)
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"config file {path!r} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path!r} must hold a mapping of option names to values")
    return {k.replace("-", "_"): v for k, v in data.items()}


def _apply_config(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    args = parser.parse_args(argv)
    if not args.config:
        return args
    defaults = _load_config_file(args.config)
    sub = parser._subparsers._group_actions[0].choices[args.command]  # the chosen subcommand's parser
    known = {a.dest for a in sub._actions} - {"config", "help"}
    unknown = sorted(set(defaults) - known)
    if unknown:
        raise ConfigError(f"unknown option(s) in {args.config}: {', '.join(unknown)}")
    for key in ("layers", "seeds"):
        if isinstance(defaults.get(key), list):
            defaults[key] = tuple(defaults[key])
    if isinstance(defaults.get("threshold"), list):
        defaults["threshold"] = tuple(float(v) for v in defaults["threshold"])
    if isinstance(defaults.get("k_range"), list):
        defaults["k_range"] = tuple(defaults["k_range"])
    sub.set_defaults(**defaults)
    return parser.parse_args(argv)


def _one_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return with_flags(" ".join(text.split()))


class _FlagNames(logging.Filter):
    """Writes the library's warnings with this command line's flags (PARAMETER_FLAGS)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = with_flags(record.getMessage()), None
        return True


def _report_bug() -> None:
    """An exception that is no user error: its traceback, and where to take it."""
    traceback.print_exc()
    print(f"itae: internal error: this is a bug in itae {__import__('itae').__version__}; please report it with "
          "the traceback above and the command that gave it", file=sys.stderr)


def _missing_top(path: str | os.PathLike) -> Path | None:
    """The outermost folder of ``path`` (itself or an ancestor) that does not exist yet, or None."""
    p = Path(os.path.abspath(path))
    if os.path.lexists(p):
        return None
    top = p
    while not os.path.lexists(top.parent) and top.parent != top:
        top = top.parent
    return top


def _remove_failed_output(top: Path, run_dir: Path | None) -> None:
    """Undo what a failed command left in ``top``, a folder it created: the folders under it (and ``top``),
    bottom-up, as far as they are empty. In a run folder that holds nothing else, the ``run.json`` that
    ``itae run`` writes first goes too ("status": "running", or "failed" with the error, nothing else done):
    it only says that a run was begun. The folder lock's file goes with it. Every other file is kept, and with
    it the folders that hold it (e.g. a store that a rerun resumes)."""
    from itae._lock import LOCK_FILE

    if not top.is_dir() or top.is_symlink():
        return
    files = [Path(folder) / name for folder, _, names in os.walk(top) for name in names]
    lock = [f for f in files if f.name == LOCK_FILE]
    files = [f for f in files if f.name != LOCK_FILE]
    if run_dir is not None and len(files) == 1 and files[0] == Path(os.path.abspath(run_dir)) / "run.json":
        try:
            begun_only = json.loads(files[0].read_text(encoding="utf-8")).get("status") in ("running", "failed")
        except (OSError, ValueError, AttributeError):
            begun_only = False
        if begun_only:
            files[0].unlink()
            files = []
    if not files:  # nothing of the command's is left: nor is its lock needed
        for f in lock:
            f.unlink(missing_ok=True)
    for folder, _, _ in os.walk(top, topdown=False):
        try:
            os.rmdir(folder)  # fails, and so keeps the folder, unless it is empty
        except OSError:
            pass


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = join_number_lists(sys.argv[1:] if argv is None else [str(a) for a in argv])
    try:
        args = _apply_config(parser, argv)
    except (ItaeError, OSError) as e:
        print(f"itae: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_ERROR
    if not args.command:
        parser.print_help(sys.stderr)
        return EXIT_ERROR
    _configure_logging(args.verbose, args.command in ("run", "embed", "inspect", "bench", "assign"))
    # the library's warnings in this command line's words, while the command runs
    flag_names, handlers = _FlagNames(), list(logging.getLogger().handlers)
    for handler in handlers:
        handler.addFilter(flag_names)
    # An output folder that this command creates and then leaves empty because it failed is removed again.
    out = getattr(args, "out", None)
    created = _missing_top(out) if out else None
    ok = False
    try:
        rc = int(args.func(args) or 0)
        ok = rc == 0
        return rc
    except KeyboardInterrupt:
        print("itae: interrupted (an embedding run resumes where it stopped when started again)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ItaeError, OSError) as e:
        if args.traceback:
            raise
        print(f"itae: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_ERROR
    except Exception:
        if args.traceback:
            raise
        _report_bug()
        return EXIT_BUG
    finally:
        for handler in handlers:
            handler.removeFilter(flag_names)
        if created is not None and not ok:
            _remove_failed_output(created, out if args.command == "run" else None)


if __name__ == "__main__":
    sys.exit(main())
