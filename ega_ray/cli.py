"""``ega-ray``: the command line. Config errors print one line and exit 2, before Ray starts."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ega_ray.constants import MAX_PIXELS
from ega_ray.data.formats import FORMATS
from ega_ray.disk import disk_full
from ega_ray.errors import find_usage_error
from ega_ray.losses import DISTILLERS

if TYPE_CHECKING:
    from ega_ray.config import Config


def _config_args(p: argparse.ArgumentParser, config_help: str, required: bool = False) -> None:
    """``--config`` and ``--set``, the same for every verb that reads a config."""
    p.add_argument("--config", required=required, help=config_help)
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set optim.epochs=10 (repeatable)",
    )
    p.add_argument("--verbose", action="store_true", help="show Ray's own INFO logs too (run.verbose)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ega-ray", description="Embedding Graph Alignment distillation on Ray.")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("distill", help="distill a teacher into a student (no --config: the embedded default)")
    _config_args(d, "YAML config; without it, the embedded default on built-in digits")
    d.add_argument("--output", help="run folder (default: runs/<run.name>); an existing run there resumes")

    t = sub.add_parser("pretrain-teacher", help="SimCLR-pretrain this project's self-supervised teacher")
    _config_args(t, "YAML config (sections data, pretrain, augment, scaling, run)", required=True)
    t.add_argument("--output", help="run folder; the teacher file is <output>/teacher.pt")

    u = sub.add_parser("tune", help="search temperature, loss weights and lr with Ray Tune (ASHA)")
    _config_args(u, "YAML config with an optional tune: section; without it, the embedded default")
    u.add_argument("--num-samples", type=int, help="trials (overrides tune.num_samples)")
    u.add_argument("--output", default="runs/tune", help="search folder: trials.csv, best.yaml, search.png, trials/")
    u.add_argument("--resume", action="store_true", help="continue the interrupted search in --output")

    c = sub.add_parser("cache-teacher", help="embed K random teacher views of every training image once")
    _config_args(c, "YAML config (its teacher, data and augment sections)", required=True)
    c.add_argument("--views", type=int, default=4, help="random teacher views per image (K)")
    c.add_argument(
        "--output", required=True, help="cache folder or s3:// / gs:// URI: embeddings/ (Parquet) and manifest.json"
    )

    b = sub.add_parser("benchmark", help="every distiller (and CE only) on the same data, teacher, student, seeds")
    _config_args(b, "YAML config; without it, the embedded default")
    b.add_argument(
        "--methods",
        default="all",
        help=f"comma-separated distillers from: {', '.join(DISTILLERS.names())}; all: every one (default)",
    )
    b.add_argument("--seeds", type=int, default=3, help="runs per method, seeds 0..N-1")
    b.add_argument("--output", default="runs/benchmark", help="results.csv, results.md, results.png, trials/")
    b.add_argument("--resume", action="store_true", help="continue the interrupted benchmark in --output")
    b.add_argument(
        "--config-weights",
        action="store_true",
        help="every method with the config's distill.gamma/beta/alpha instead of its reference weights",
    )
    b.add_argument(
        "--tune-trials",
        type=int,
        default=0,
        metavar="K",
        help="also give every method the same K-trial search (ASHA) over its own knobs and the lr, then run "
        "the seeds with each method's best settings: tuned rows beside the reference ones",
    )

    r = sub.add_parser(
        "prepare",
        help="convert a dataset into ega-ray's Parquet format",
        description="Convert a dataset's official files into OUT/<split>/part-NNNNN.parquet (columns image, label, "
        "index) and OUT/prepare.json, atomically. See docs/data.md.",
    )
    r.add_argument("name", choices=FORMATS.names(), help="the source format")
    r.add_argument(
        "--src",
        help="the official folder (cifar-100-python/, stl10_binary/, tiny-imagenet-200/) or the image folder; "
        f"with --download, where to download to. Not used by {', '.join(FORMATS.bundled())}",
    )
    r.add_argument("--out", required=True, help="output folder; receives one folder per split and prepare.json")
    r.add_argument("--skip-bad", action="store_true", help="skip (and report) image files that cannot be decoded")
    r.add_argument(
        "--download",
        action="store_true",
        help=f"{', '.join(FORMATS.downloadable())}: download into --src with torchvision",
    )
    r.add_argument("--rows-per-file", type=int, default=10_000, help="rows per Parquet file (default 10000)")
    r.add_argument(
        "--max-pixels",
        type=int,
        default=MAX_PIXELS,
        help=f"refuse image files with more pixels (default {MAX_PIXELS:,}; --skip-bad skips them)",
    )

    v = sub.add_parser("eval", help="a saved student on a split: top-1/5, per class, confusion matrix, kNN probe")
    v.add_argument("--student", required=True, help="a run's student_best.pt / student_last.pt (or .safetensors)")
    v.add_argument(
        "--data", required=True, help="a labeled Parquet split (`ega-ray prepare`); builtin:digits: its test split"
    )
    v.add_argument(
        "--knn-train", help="the kNN probe's labeled bank, e.g. the training split; default: leave-one-out on --data"
    )
    v.add_argument("--knn-k", type=int, default=10, help="neighbours that vote in the kNN probe (default 10)")
    v.add_argument(
        "--output", help="folder for eval.json and confusion.png (default: <student's folder>/eval-<stem>-<split>)"
    )
    v.add_argument("--batch-size", type=int, default=256, help="images per forward pass (default 256)")
    v.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="default: cuda when there is one")

    e = sub.add_parser("export", help="write a saved student's other formats beside it (.safetensors, .pt2, --onnx)")
    e.add_argument("--student", required=True, help="a run's student_best.pt / student_last.pt (or .safetensors)")
    e.add_argument(
        "--onnx", action="store_true", help="also <stem>.onnx (needs the extra: pip install 'ega-ray[onnx]')"
    )
    e.add_argument(
        "--force",
        action="store_true",
        help="replace files with the target names that ega-ray cannot prove it wrote (by default: refused)",
    )
    return p


def commands() -> list[str]:
    """The CLI's verbs (each has an entry script in jobs/ for `ray job submit`)."""
    sub = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    return list(sub.choices)


def _terminate(signum: int, frame) -> None:  # noqa: ARG001 - signal handler signature
    """SIGTERM ends a command like Ctrl-C does: temporary folders removed, locks released (exit 143)."""
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        return _run(args)
    except KeyboardInterrupt as err:  # Ctrl-C: temporary folders are already removed, locks released
        print(f"ega-ray: interrupted{f': {err}' if str(err) else ''}", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - a user's error raised inside Ray comes back wrapped
        found = find_usage_error(err) or disk_full(err)  # a full disk wherever it happened: one line too
        if found is None:
            raise
        for problem in found.problems:  # one line each (every problem of a config file at once)
            print(f"ega-ray: {found.label}: {problem}", file=sys.stderr)
        return 2


def _prepare(args: argparse.Namespace) -> int:
    """``ega-ray prepare``: convert a dataset into Parquet splits (``data.prepare.run_prepare``).

    Args:
        args: the parsed command line.

    Returns:
        The exit status.
    """
    from ega_ray.data.prepare import run_prepare

    return run_prepare(args)


def _eval(args: argparse.Namespace) -> int:
    """``ega-ray eval``: score a saved student on a split (``evaluate.run_eval``) and print the summary.

    Args:
        args: the parsed command line.

    Returns:
        The exit status.
    """
    from ega_ray.evaluate import run_eval, summary_lines

    result = run_eval(args.student, args.data, args.knn_train, args.knn_k, args.output, args.batch_size, args.device)
    print("\n".join(summary_lines(result)))
    return 0


def _export(args: argparse.Namespace) -> int:
    """``ega-ray export``: write a saved student's other formats beside it (``export.run_export``).

    Args:
        args: the parsed command line.

    Returns:
        The exit status.
    """
    from ega_ray.export import run_export

    written = run_export(args.student, args.onnx, args.force)
    print("\n".join(f"{fmt}: {path}" for fmt, path in written.items()))
    return 0


def _training_config(args: argparse.Namespace):
    """The config of ``distill --config`` and ``pretrain-teacher``: the file, the overrides and ``--output``."""
    from ega_ray.config import load_config  # here, not at import: `ega-ray --help` stays fast

    # JSON-quoted: a folder named like a number or a mapping stays a string when parsed as YAML
    overrides = args.overrides + ([f"run.output={json.dumps(args.output)}"] if args.output else [])
    return load_config(args.config, overrides)


def _print_summary(summary: dict) -> int:
    print("\n".join(f"{k}: {v}" for k, v in summary.items()))
    return 0


def _distill(args: argparse.Namespace) -> int:
    """``ega-ray distill``: the embedded default without ``--config``, else ``run_distill``.

    Args:
        args: the parsed command line.

    Returns:
        The exit status.
    """
    if args.config is None:
        from ega_ray.embedded import run_embedded

        run_embedded(args.overrides, args.output)
        return 0
    cfg = _training_config(args)  # before torch and Ray are imported: a config error stays fast
    from ega_ray.driver.launch import run_distill

    return _print_summary(run_distill(cfg))


def _pretrain_teacher(args: argparse.Namespace) -> int:
    """``ega-ray pretrain-teacher``: SimCLR-pretrain the self-supervised teacher (``run_pretrain``).

    Args:
        args: the parsed command line.

    Returns:
        The exit status.
    """
    cfg = _training_config(args)
    from ega_ray.driver.launch import run_pretrain

    return _print_summary(run_pretrain(cfg))


def _experiment_config(
    args: argparse.Namespace, overrides: list[str], command: str, embedded: Callable[[list[str], str], Config]
) -> Config | None:
    """What ``run_search`` and ``run_benchmark`` take as their config.

    Args:
        args: the parsed command line (``--resume``, ``--config``, ``--output``).
        overrides: the ``--set`` values.
        command: ``tune`` or ``benchmark``: the kind of experiment ``--output`` may hold.
        embedded: makes the embedded default's config from (overrides, output), its teacher ready.

    Returns:
        None with ``--resume`` (read back from the folder); without ``--config`` the embedded default, once
        ``--output`` is known to be usable (its teacher may take minutes to pretrain); else the config.
    """
    from ega_ray.config import load_config

    if args.resume:
        return None
    if args.config is None:
        from ega_ray.tune.experiment import refuse_earlier_experiment

        refuse_earlier_experiment(Path(args.output).expanduser().resolve(), command)
        return embedded(overrides, args.output)
    return load_config(args.config, overrides)


def _tune(args: argparse.Namespace) -> int:
    """``ega-ray tune``: a Ray Tune search (``tune.search.run_search``), new or ``--resume``d.

    Args:
        args: the parsed command line.

    Returns:
        The exit status.
    """
    from ega_ray.embedded import embedded_tune_config
    from ega_ray.tune.search import run_search

    overrides = args.overrides + ([f"tune.num_samples={args.num_samples}"] if args.num_samples else [])
    run_search(_experiment_config(args, overrides, "tune", embedded_tune_config), args.output, resume=args.resume)
    return 0


def _benchmark(args: argparse.Namespace) -> int:
    """``ega-ray benchmark``: every distiller on the same setting (``tune.benchmark.run_benchmark``).

    Args:
        args: the parsed command line.

    Returns:
        The exit status.
    """
    from ega_ray.embedded import embedded_with_teacher
    from ega_ray.tune.benchmark import run_benchmark
    from ega_ray.tune.methods import parse_methods

    methods = parse_methods(args.methods)
    run_benchmark(
        _experiment_config(args, args.overrides, "benchmark", embedded_with_teacher),
        methods,
        args.seeds,
        args.output,
        resume=args.resume,
        reference_weights=not args.config_weights,
        tune_trials=args.tune_trials,
    )
    return 0


def _cache_teacher(args: argparse.Namespace) -> int:
    """``ega-ray cache-teacher``: embed K teacher views of every training image once (``build_cache``).

    Args:
        args: the parsed command line.

    Returns:
        The exit status.
    """
    from ega_ray.config import load_config

    cfg = load_config(args.config, args.overrides)
    from ega_ray.driver.teacher_cache import build_cache

    return _print_summary(build_cache(cfg, args.views, args.output))


# Each verb's function: it reads its arguments, runs the command and returns the exit status.
VERBS: dict[str, Callable[[argparse.Namespace], int]] = {
    "distill": _distill,
    "pretrain-teacher": _pretrain_teacher,
    "tune": _tune,
    "cache-teacher": _cache_teacher,
    "benchmark": _benchmark,
    "prepare": _prepare,
    "eval": _eval,
    "export": _export,
}


def _run(args: argparse.Namespace) -> int:
    from ega_ray.lockfile import check_environment

    check_environment()  # under `ray job submit`: this node runs the lock's versions
    if getattr(args, "verbose", False):
        args.overrides.append("run.verbose=true")
    return VERBS[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
