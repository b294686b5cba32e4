"""``mongoproxy hash-password``: print the stored credential for a proxy user's password.

    $ mongoproxy hash-password acme_app            # prompts twice on a terminal
    Password for acme_app:
    Again:
    SCRAM-SHA-256$15000:...$...:...
    $ printf %s "$PASSWORD" | mongoproxy hash-password --iterations 20000

On a terminal the password is read with ``getpass`` (not echoed) and asked twice;
otherwise it is all of stdin, minus one trailing newline (``\\n`` or ``\\r\\n``) so that
``echo secret |`` works; any other whitespace is part of the password. stdout carries
the stored form only, so it can be captured; prompts and errors go to stderr. The
password is SASLprep'd as MongoDB does for SCRAM-SHA-256. Exit status: 0, or 2 for bad
usage or an unusable password (empty, SASLprep-prohibited, mismatched confirmation).
"""

from __future__ import annotations

import argparse
import getpass
import sys
from collections.abc import Sequence
from typing import TextIO

from scramp import ScramException
from scramp.utils import saslprep

from proxy.identity.credentials import (
    DEFAULT_ITERATIONS,
    MAX_ITERATIONS,
    MIN_ITERATIONS,
    hash_password,
)


def build_parser(prog: str = "mongoproxy hash-password") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Print the SCRAM-SHA-256 stored credential (tenancy.users[].password_sha256) "
        "for a password read from stdin, or prompted for on a terminal.",
    )
    add_arguments(parser)
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The subcommand's arguments, for wiring it into another parser."""
    parser.add_argument(
        "--iterations", type=int, default=DEFAULT_ITERATIONS,
        help=f"PBKDF2 iteration count ({MIN_ITERATIONS}..{MAX_ITERATIONS}, "
             f"default {DEFAULT_ITERATIONS}, MongoDB's)",
    )
    parser.add_argument(
        "username", nargs="?", metavar="USERNAME",
        help="the user the password is for (used in the prompt and checked for SASLprep)",
    )


def hash_password_main(
    argv: Sequence[str] | None = None,
    *,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """Run the subcommand (``argv`` without the program and subcommand names)."""
    args = build_parser().parse_args(argv)
    return run(args, stdin=stdin, stdout=stdout, stderr=stderr)


def run(
    args: argparse.Namespace,
    *,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """The subcommand on already parsed arguments (``--iterations``, ``username``)."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    username: str | None = args.username
    if username is not None:
        try:
            if not saslprep(username):
                raise ScramException("the user name is empty")
        except ScramException as exc:
            print(f"hash-password: user name {username!r} cannot be used: {exc}", file=stderr)
            return 2
    try:
        password = _read_password(stdin, stderr, username)
    except _InputError as exc:
        print(f"hash-password: {exc}", file=stderr)
        return 2
    try:
        stored = hash_password(password, iterations=args.iterations)
    except ValueError as exc:
        print(f"hash-password: {exc}", file=stderr)
        return 2
    print(stored, file=stdout)
    return 0


class _InputError(Exception):
    pass


def _read_password(stdin: TextIO, stderr: TextIO, username: str | None) -> str:
    if stdin.isatty():
        prompt = f"Password for {username}: " if username else "Password: "
        try:
            first = getpass.getpass(prompt, stream=stderr)
            again = getpass.getpass("Again: ", stream=stderr)
        except (EOFError, KeyboardInterrupt):
            raise _InputError("no password entered") from None
        if first != again:
            raise _InputError("the passwords do not match")
        password = first
    else:
        password = stdin.read()
        if password.endswith("\r\n"):
            password = password[:-2]
        elif password.endswith("\n"):
            password = password[:-1]
    if not password:
        raise _InputError("the password is empty")
    return password
