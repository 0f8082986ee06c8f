"""The ``optax-layca`` command (also ``python -m optax_layca``): argument parsing only.

Commands (``demo`` when none is given)::

  optax-layca demo      [--dataset D] [--model M] [--epochs N] [--optimizers a,b] ...
  optax-layca sweep     [--ks=-5,-3,-1] [--alphas=-0.5,0,0.5] ...
  optax-layca lca       [--lr LR] [--iters N | --epochs N] ...
  optax-layca reproduce NAME [NAME ...] [--quick] [--seed S] [--out DIR]
  optax-layca reproduce --list

``demo`` trains one initialisation with SGD, SGD + weight decay, Adam, Layca, Adam + Layca
and the papers' LARS (default: MNIST-1D, 6-layer MLP) and writes rotation curves, per-epoch
rotation, accuracy curves, ``report.md``, ``results.json`` and one rotation history per run
under ``--out``; ``sweep`` trains Layca over ``ρ(0) = 3^k × α`` in one vmapped program;
``lca`` writes the Loss Change Allocation report of SGD and Adam; ``reproduce`` runs a paper
experiment (``--list`` names them with their references). The work is done by
:mod:`._commands` and :mod:`._experiments` over the one training loop of :mod:`._train`.

``--help``, ``--version`` and argument errors answer without importing jax. Every failure
prints one line ``optax-layca: error: …`` on stderr and returns exit status 2 (set
``OPTAX_LAYCA_DEBUG=1`` to get the traceback instead); ``--out`` is checked writable before any
training. Compiled programs are cached under the user's cache folder
(``~/.cache/optax_layca/jax``; ``OPTAX_LAYCA_JAX_CACHE=0`` turns this off).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

__all__ = ["CLIError", "COMMANDS", "build_parser", "main"]

PROG = "optax-layca"
DEFAULT_OUT = "optax_layca_out"
COMMANDS = ("demo", "sweep", "lca", "reproduce")
MODEL_NAMES = ("fc", "deep", "mlp", "cnn", "resnet")  # optax_layca.models.MODELS (no flax here)
DEMO_KEYS = ("sgd", "sgd_wd", "adam", "layca", "adam_layca", "lars")
QUICK_DEMO = ("sgd", "sgd_wd", "layca", "lars")
MAX_SEED = 2**32 - 1
# per command: (dataset, model, epochs, quick epochs, quick training examples)
DEFAULTS = {
    "demo": ("mnist1d", "deep", 40, 3, 1024),
    "sweep": ("mnist1d", "deep", 20, 3, 1000),
    "lca": ("digits", "fc", None, None, 128),
}


class CLIError(Exception):
    """A user error: reported as one line on stderr, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors raise :class:`CLIError` (one line, no usage dump)."""

    def error(self, message: str):
        raise CLIError(message)


def _int_in(name: str, low: int, high: int | None = None):
    """argparse type: an integer in ``[low, high]``; the error names the flag."""

    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer; got {s!r}") from None
        if v < low or (high is not None and v > high):
            bound = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise argparse.ArgumentTypeError(f"{name} must be {bound}; got {v}")
        return v

    return parse


def _positive_float(name: str):
    def parse(s: str) -> float:
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number; got {s!r}") from None
        if not v > 0 or v == float("inf"):
            raise argparse.ArgumentTypeError(f"{name} must be > 0 and finite; got {s}")
        return v

    return parse


def _list_of(kind: type, name: str, low: float | None = None, high: float | None = None):
    """argparse type: comma-separated values of ``kind`` within ``[low, high]``."""

    def parse(s: str) -> list:
        try:
            values = [kind(v) for v in s.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{name}: expected comma-separated numbers; got {s!r}"
            ) from None
        bad = [
            v for v in values if (low is not None and v < low) or (high is not None and v > high)
        ]
        if not values or bad:
            raise argparse.ArgumentTypeError(f"{name} must lie in [{low}, {high}]; got {s!r}")
        return values

    return parse


def _training_options(parser: argparse.ArgumentParser, command: str) -> None:
    from ..data import DATASETS

    dataset, model, epochs, quick_epochs, _ = DEFAULTS[command]
    g = parser.add_argument_group("training")
    g.add_argument(
        "--dataset",
        default=dataset,
        help=f"{', '.join(DATASETS)} or a .npz with x_train, y_train, x_test, y_test "
        f"(default {dataset})",
    )
    g.add_argument(
        "--model", default=model, choices=MODEL_NAMES, help=f"reference model (default {model})"
    )
    if epochs is not None:
        g.add_argument(
            "--epochs",
            type=_int_in("--epochs", 1),
            help=f"training epochs (default {epochs}; {quick_epochs} with --quick)",
        )
    g.add_argument(
        "--batch-size",
        type=_int_in("--batch-size", 1),
        default=32,
        help="minibatch size (default 32)",
    )


def _common_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("run")
    g.add_argument(
        "--seed",
        type=_int_in("--seed", 0, MAX_SEED),
        default=0,
        help="seed of the initialisation, data and batches (default 0)",
    )
    g.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default ./{DEFAULT_OUT}/)")
    g.add_argument("--quick", action="store_true", help="small, fast configuration")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``optax-layca`` (errors raise :class:`CLIError`)."""
    parser = _Parser(
        prog=PROG,
        description="Layer rotation and Loss Change Allocation experiments (Layca, LARS, LCA) "
        "on embedded data. Default command: demo.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser, metavar="COMMAND")
    helps = {
        "demo": "SGD, SGD+wd, Adam, Layca, Adam+Layca, LARS: rotation curves and report",
        "sweep": "Layca over rho(0)=3^k x alpha (vmapped): Fig. 2a/2b/3 of the grid",
        "lca": "Loss Change Allocation report of SGD and Adam",
        "reproduce": "run a paper experiment (reproduce --list)",
    }
    cmd = {name: sub.add_parser(name, help=h, description=h) for name, h in helps.items()}
    for name in ("demo", "sweep", "lca"):
        _training_options(cmd[name], name)
    for p in cmd.values():
        _common_options(p)
    cmd["demo"].add_argument(
        "--optimizers",
        type=_choices("--optimizers", DEMO_KEYS),
        help=f"comma-separated subset of {','.join(DEMO_KEYS)} (default all)",
    )
    cmd["sweep"].add_argument(
        "--ks",
        type=_list_of(int, "--ks", -20, 5),
        help="exponents k of rho(0)=3^k (default -6,...,-1; quick -5,-3,-1)",
    )
    cmd["sweep"].add_argument(
        "--alphas",
        type=_list_of(float, "--alphas", -1.0, 1.0),
        help="alpha values in [-1, 1] (default -0.8,-0.4,0,0.4,0.8)",
    )
    cmd["lca"].add_argument(
        "--lr",
        type=_positive_float("--lr"),
        default=0.05,
        help="SGD (momentum 0.9) learning rate (default 0.05)",
    )
    length = cmd["lca"].add_mutually_exclusive_group()
    length.add_argument(
        "--iters",
        type=_int_in("--iters", 1),
        help="training iterations analysed (default 150; 20 with --quick, on 128 examples)",
    )
    length.add_argument(
        "--epochs",
        type=_int_in("--epochs", 1),
        help="analyse this many whole epochs instead of --iters",
    )
    cmd["reproduce"].add_argument("names", nargs="*", metavar="NAME", help="experiment(s)")
    cmd["reproduce"].add_argument(
        "--list", action="store_true", help="list the experiments with their paper references"
    )
    return parser


def _choices(name: str, valid: Sequence[str]):
    def parse(s: str) -> list[str]:
        keys = [k.strip() for k in s.split(",") if k.strip()]
        unknown = [k for k in keys if k not in valid]
        if unknown or not keys:
            raise argparse.ArgumentTypeError(
                f"{name}: unknown {unknown or s!r}; choose from {', '.join(valid)}"
            )
        return keys

    return parse


def _normalise(argv: list[str]) -> list[str]:
    """``demo`` when no command is given; a command given after options moves first; an
    unknown command word is an error naming the valid ones."""
    if not argv or argv[0] in ("-h", "--help", "--version"):
        return argv
    if argv[0] in COMMANDS:
        return argv
    if not argv[0].startswith("-"):
        raise CLIError(f"unknown command {argv[0]!r}; choose from {', '.join(COMMANDS)}")
    cmd = next((a for a in argv if a in COMMANDS), None)
    if cmd is None:
        return ["demo", *argv]
    argv = list(argv)
    argv.remove(cmd)
    return [cmd, *argv]


def _run(args: argparse.Namespace) -> None:
    """Runs the parsed command (imports jax from here on)."""
    _enable_compile_cache()
    if args.command == "reproduce":
        _reproduce(args)
        return
    from . import _commands

    config = _train_config(args)
    progress = not args.no_progress
    if args.command == "demo":
        # --quick: the papers' core comparison only (three compiled programs instead of five)
        which = args.optimizers or (QUICK_DEMO if args.quick else None)
        _commands.run_demo(config, args.out, progress=progress, which=which)
    elif args.command == "sweep":
        ks = args.ks or ([-5, -3, -1] if args.quick else [-6, -5, -4, -3, -2, -1])
        alphas = args.alphas or ([-0.6, 0.0, 0.6] if args.quick else [-0.8, -0.4, 0.0, 0.4, 0.8])
        _commands.run_sweep(config, args.out, ks=ks, alphas=alphas, progress=progress)
    else:
        iters = args.iters or (20 if args.quick else 150)
        if args.epochs is not None:
            iters = None  # whole epochs: the training length decides
        _commands.run_lca(config, args.out, lr=args.lr, iters=iters, progress=progress)


def _train_config(args: argparse.Namespace):
    from ._train import TrainConfig

    _, _, epochs, quick_epochs, quick_train = DEFAULTS[args.command]
    if args.command == "lca":  # --iters: run_lca sets the epochs that cover them
        return TrainConfig(
            dataset=args.dataset,
            model=args.model,
            batch_size=args.batch_size,
            seed=args.seed,
            epochs=args.epochs or 1,
            records_per_epoch=1,
            num_train=quick_train if args.quick else None,  # each step: ~3 passes over it
        )
    return TrainConfig(
        dataset=args.dataset,
        model=args.model,
        epochs=args.epochs or (quick_epochs if args.quick else epochs),
        batch_size=args.batch_size,
        seed=args.seed,
        num_train=quick_train if args.quick else None,
        records_per_epoch=4,
        # the sweep picks ρ(0) per α on a held-out 10%, as the authors' grid search does
        validation=0.1 if args.command == "sweep" else 0.0,
        eval_every=1 if args.command == "demo" else 10**9,
    )


def _reproduce(args: argparse.Namespace) -> None:
    from ._experiments import ExperimentConfig, _runner, get

    if args.list:
        print("\n".join(_runner.list_lines()))
        return
    if not args.names:
        raise CLIError("reproduce: give an experiment NAME (optax-layca reproduce --list)")
    try:
        for name in args.names:
            get(name)
    except KeyError as e:
        raise CLIError(f"reproduce: {e.args[0]}") from None
    config = ExperimentConfig(
        quick=args.quick, seed=args.seed, out=args.out, progress=not args.no_progress
    )
    for name in args.names:
        record = _runner.reproduce(name, config)
        print(
            f"{name}: {record['verdict']['status']} — wrote {args.out}/{name}.png, "
            f"{name}.json, report.md ({record['timings']['total_s']:.0f} s)"
        )


def _enable_compile_cache() -> None:
    """Persistent XLA compilation cache under the user's cache folder (repeated runs skip
    most compilation); ``OPTAX_LAYCA_JAX_CACHE=0`` or an unwritable folder: no cache."""
    if os.environ.get("OPTAX_LAYCA_JAX_CACHE", "1") == "0":
        return
    import jax

    from ..data import user_cache_dir

    if jax.config.jax_compilation_cache_dir:  # the user's own setting wins
        return
    path = user_cache_dir("jax")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


def _version() -> str:
    from .. import __version__

    return __version__


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``optax-layca``; returns the process exit status.

    Examples:
      >>> main(["demo", "--epochs", "-1"])
      2
    """
    from ..data import DataError

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        try:
            args = build_parser().parse_args(_normalise(argv))
        except SystemExit as e:  # --help
            return int(e.code or 0)
        if args.version:
            print(f"{PROG} {_version()}")
            return 0
        if args.command is None:
            args = build_parser().parse_args(["demo"])
        _run(args)
        return 0
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except (CLIError, DataError, OSError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - every failure is one line; OPTAX_LAYCA_DEBUG shows it
        if os.environ.get("OPTAX_LAYCA_DEBUG"):
            raise
        print(f"{PROG}: error: {type(e).__name__}: {_one_line(str(e))}", file=sys.stderr)
        return 2


def _one_line(text: str) -> str:
    return " ".join(text.split())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
