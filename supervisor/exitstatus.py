"""The exit statuses of the `adapter-supervisor` command line, shared by
the parser (which lists them in --help) and the commands."""

from __future__ import annotations

import signal

EX_OK = 0
EX_ERROR = 1
# argparse's status for a command line it cannot parse; ours for arguments
# the daemon would refuse.
EX_USAGE = 2
EX_UNAVAILABLE = 69
# sysexits' "cannot create (user) output file".
EX_CANTCREAT = 73
EX_CONFIG = 78
# Interrupted by Ctrl-C (128 + SIGINT), as shells report it.
EX_INTERRUPTED = 130
EX_BROKEN_PIPE = 128 + signal.SIGPIPE

# Every status the command line exits with, for --help.
EXIT_STATUSES = f"""\
exit status:
  {EX_OK:<4}success (also: `status --watch` ended with Ctrl-C, `logs --follow` of a target that went away)
  {EX_ERROR:<4}the daemon answered with an error (its message, error name and code are printed)
  {EX_USAGE:<4}bad command line: an unknown option, a missing or out-of-range argument
  {EX_UNAVAILABLE:<4}the daemon cannot be reached or went away; for `serve`, another daemon holds its socket or state_dir
  {EX_CANTCREAT:<4}install-units could not read a shipped unit or write one
  {EX_CONFIG:<4}the config is bad (check-config, serve)
  {EX_INTERRUPTED:<4}interrupted by Ctrl-C
  {EX_BROKEN_PIPE:<4}whoever read the output stopped reading (e.g. `| head`)
"""
