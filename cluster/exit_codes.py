"""The exit statuses of every ``polydistill`` command (cluster/cli.py and its ``tune`` command).

0: the command did what it was asked; 2: the config or the input is invalid and nothing was
started; 1: a job started and failed.
"""

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
