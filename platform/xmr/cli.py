"""The ``xmr`` console script. Each area registers its own subcommands; imports stay lazy
enough that ``xmr --help`` answers without starting Ray."""

from __future__ import annotations

import argparse
import sys

from xmr.ray.compat import use_token_auth

use_token_auth()  # before anything imports Ray: every command and the processes it starts agree on the mode

from xmr import __version__  # noqa: E402
from xmr.config import ConfigError, SpaceError, SpecError
from xmr.runtime import Runtime


def _config_show(args: argparse.Namespace) -> int:
    from xmr.checks import check, resolve
    from xmr.config import load_config

    cfg = load_config(args.config, args.set)
    if args.resolve:
        cfg, _ = resolve(cfg)
    check(cfg)
    print(cfg.to_yaml(), end="")
    return 0


def _register_config(subparsers) -> None:
    parser = subparsers.add_parser("config", help="show and validate run configurations")
    sub = parser.add_subparsers(dest="config_command", required=True, metavar="COMMAND")
    show = sub.add_parser("show", help="print a preset or YAML file with overrides applied and validated")
    show.add_argument("config", help="preset name (sccmrl, qacln, ...) or path to a YAML file")
    show.add_argument("--set", action="append", default=[], metavar="A.B=VALUE", help="override a field (repeatable)")
    show.add_argument("--resolve", action="store_true", help="also check data.path and fill dims from its manifest")
    show.set_defaults(func=_config_show)


def _no_default(value) -> bool:
    return value is None or value is False or value is argparse.SUPPRESS or (isinstance(value, list) and not value)


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Every option's help says its default: appended where the text does not already."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text.lower() or _no_default(action.default) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def _use_formatter(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = DefaultsHelpFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _use_formatter(sub)


def build_parser() -> argparse.ArgumentParser:
    from xmr.compare.cli import register as register_compare
    from xmr.data.cli import register as register_data
    from xmr.metrics.cli import register as register_metrics
    from xmr.serve.cli import register as register_serve
    from xmr.train.cli import register as register_train
    from xmr.tune.cli import register as register_tune

    parser = argparse.ArgumentParser(
        prog="xmr", description="Train, tune and serve cross-modal retrieval models (multi-negative contrastive learning) on Ray.")
    parser.add_argument("--version", action="version", version=f"xmr {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    register_train(subparsers)
    register_tune(subparsers)
    register_serve(subparsers)
    register_compare(subparsers)
    register_data(subparsers)
    register_metrics(subparsers)
    _register_config(subparsers)
    _use_formatter(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # the command's runtime, read once here from its flags and the environment and passed down
    args.runtime = Runtime.from_env(verbose=bool(getattr(args, "verbose", False)))
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"xmr: configuration error: {exc}", file=sys.stderr)
        return 2
    except SpecError as exc:
        print(f"xmr: comparison spec error: {exc}", file=sys.stderr)
        return 2
    except SpaceError as exc:
        print(f"xmr: search space error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # a checkpoint that cannot be read is the user's input too (read lazily: no torch here)
        checkpoint = sys.modules.get("xmr.checkpoint")
        if checkpoint is not None and isinstance(exc, checkpoint.CheckpointError):
            print(f"xmr: checkpoint error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
