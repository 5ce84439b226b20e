"""Command lines: the one-line user error every script ends with, the argument parser that reports usage
errors the same way, and the small argument checks the scripts share.

Every script wraps its `main` with `cli_main`, so that a `UserError` raised anywhere (a bad path, a damaged
checkpoint, an unknown config key) ends the program with one line `error: ...` on stderr and exit status 2,
never a traceback from deep inside torch.
"""

import argparse
import os
import sys


class UserError(Exception):
    """An error caused by the user's input; its message says what is wrong and how to fix it.

    `exit_status` is the program's exit status (2 unless a subclass says otherwise)."""
    exit_status = 2


def cli_main(main, argv=None):
    """Run `main(argv)` and turn UserError / Ctrl-C into a clean exit."""
    try:
        code = main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_status)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # `... --help | head`: the reader left; no traceback, and none at exit either
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)
    sys.exit(code or 0)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors (an unknown option, an invalid choice, a value of the wrong type) are the
    scripts' one line `error: ...` with exit status 2 (a UserError for cli_main), not a usage block.

    Options are spelled with underscores (`--num_seqs`, nanoGPT's `--key=value` style); the same option with
    hyphens (`--num-seqs`) is accepted too, so --help lists one spelling and the command line takes both."""

    def error(self, message):
        raise UserError(f"{message} (python {self.prog} --help lists the options)")

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        end = args.index("--") if "--" in args else len(args)  # after `--` everything is a positional value
        return super().parse_known_args([self._spelled(a) for a in args[:end]] + args[end:], namespace)

    def _spelled(self, arg):
        """`arg` with its option name in the spelling this parser knows (a prefix of one counts, as argparse
        accepts unambiguous abbreviations)."""
        if not arg.startswith("--"):
            return arg
        name, eq, value = arg.partition("=")
        for spelling in (name, "--" + name[2:].replace("-", "_"), "--" + name[2:].replace("_", "-")):
            if any(option.startswith(spelling) for option in self._option_string_actions):
                return spelling + eq + value
        return arg


SEED_MAX = 2**32 - 1  # numpy's legacy seeding takes 32 bits; torch takes 64


def is_int(x):
    """An int that is not a bool (JSON and pickles give True where a count was meant)."""
    return isinstance(x, int) and not isinstance(x, bool)


def is_number(x):
    """An int or float that is not a bool."""
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def add_to_registry(registry, entry, kind):
    """Add a named entry (an attention variant, a compression method) to its registry; a taken name is an error."""
    if entry.name in registry:
        raise ValueError(f"{kind} {entry.name!r} is already registered")
    registry[entry.name] = entry
    return entry


def check_seed(seed, flag="--seed"):
    if not is_int(seed) or not 0 <= seed <= SEED_MAX:
        raise UserError(f"{flag} must be an integer from 0 to {SEED_MAX}, got {seed}")
    return seed


def one_line(e, limit=300):
    """An exception's message on one line (whitespace collapsed), at most `limit` characters."""
    text = " ".join(str(e).split())
    return text[:limit] + ("..." if len(text) > limit else "")
