"""The exit statuses of every ``polydistill`` command (cluster/cli.py and its ``tune`` command).

0: the command did what it was asked; 2: the config or the input is invalid and nothing was
started; 1: a job started and failed; 3: the job was stopped from outside (``polydistill stop``,
SIGTERM) before it completed and ``polydistill resume`` continues it; 130 (128 + SIGINT, the
shell's own for Ctrl-C): Ctrl-C stopped it, likewise resumable.
"""

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_STOPPED = 3
EXIT_INTERRUPTED = 130
