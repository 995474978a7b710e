"""The exit statuses of every ``polydistill`` command (cluster/cli.py and its ``tune`` command).

0: the command did what it was asked; 2: the config or the input is invalid and nothing was
started; 1: a job started and failed; 3: the job was stopped from outside (``polydistill stop``,
SIGTERM) before it completed and ``polydistill resume`` continues it; 4: the job completed with
dead letters (report.json's status ``completed_with_dead_letters``): every sample was distilled once
or dead-lettered with its reason (``samples_dead_lettered``), and the student is saved; 130 (128 +
SIGINT, the shell's own for Ctrl-C): Ctrl-C stopped it, likewise resumable.
"""

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_STOPPED = 3
EXIT_DEAD_LETTERS = 4
EXIT_INTERRUPTED = 130
