"""``tokenloom run JOB``: run a registered SPMD job on real ranks through :func:`tokenloom.comm.launch.run_job`.

The command only parses flags and calls the launcher. A job module (``tokenloom.jobs.<name>``)
exposes ``add_flags(parser)``, ``config_from_args(args) -> config`` (``args.world_size`` holds the
number of ranks), ``job(comm, config)`` and ``report(results, args) -> exit code``. A job whose
module does not import (not written yet, or a missing optional dependency) is left out, so
``tokenloom run --help`` always works. Nothing heavy is imported until a job runs.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os

from tokenloom.comm.launch import MIN_TIMEOUT_S
from tokenloom.commands.args import OneLineParser, arg_float, arg_int

# name -> (module, one-line help)
JOBS = {
    "attention": ("tokenloom.jobs.attention", "sequence-parallel attention (TokenRing, Ring, Ulysses)"),
    "tokenweave": ("tokenloom.jobs.tokenweave", "TokenWeave tensor-parallel layer (split + overlap)"),
    "drill": ("tokenloom.jobs.drill", "fault drill: kill/stop/skip one rank and see who is named"),
    "decode": ("tokenloom.jobs.decode", "decode steps over a sharded KV cache (pass-Q, pass-KV)"),
}

_DESCRIPTIONS = {
    "attention": "Sequence-parallel attention forward+backward on every rank with random inputs "
                 "(the same seed everywhere), per-rank median times, and with --check the max error "
                 "of out, lse, dq, dk, dv against the fp64 single-process reference. Exit 1 if a "
                 "check fails.",
}


def _available(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def add_launch_flags(p: argparse.ArgumentParser, *, defaults: bool = True) -> None:
    """The flags every job shares: where its ranks run and how long a lost peer may go unnoticed.

    They are accepted before the job (``run --launcher ray JOB``) and after it (``run JOB
    --launcher ray``); only the first set carries defaults, so the second cannot reset them.
    """
    keep = {} if defaults else {"default": argparse.SUPPRESS}
    g = p.add_argument_group("launch")
    g.add_argument("--launcher", choices=("auto", "torchrun", "local", "ray"), **(keep or {"default": "auto"}),
                   help="auto: torchrun when its environment is set, ray when --address is given, "
                        "else local (forked CPU ranks over gloo)")
    g.add_argument("--world-size", type=arg_int(1, 4096), **(keep or {"default": 2}),
                   help="ranks for --launcher local/ray (torchrun sets its own)")
    g.add_argument("--address", **(keep or {"default": None}),
                   help="Ray cluster address for --launcher ray ('auto': the running cluster); "
                        "default: start a local Ray")
    g.add_argument("--timeout", type=arg_float(MIN_TIMEOUT_S, 86_400), **(keep or {"default": 60.0}),
                   help="seconds before a lost/stopped rank or a stuck transfer is reported as an "
                        f"error naming the rank (bounds one wait, not the whole run; at least "
                        f"{MIN_TIMEOUT_S:g}: heartbeats cannot judge finer)")


def _world_size(args: argparse.Namespace, launcher: str) -> int:
    if launcher == "torchrun" and "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    return args.world_size


def _run(args: argparse.Namespace) -> int:
    from tokenloom.comm.launch import resolve_launcher, run_job

    module = importlib.import_module(JOBS[args.job][0])
    launcher = resolve_launcher(args.launcher, args.address)
    args.world_size = _world_size(args, launcher)
    config = module.config_from_args(args)
    results = run_job(module.job, config, launcher=launcher, world_size=args.world_size,
                      timeout_s=args.timeout, address=args.address)
    if launcher == "torchrun" and int(os.environ.get("RANK", "0")) != 0:
        return 0  # rank 0 reports for everyone
    return int(module.report(results, args) or 0)


class _JobParser(OneLineParser):
    """A job's parser that imports the job module and adds its flags only when it is used, so
    ``tokenloom run --help`` and the other commands never import a job (or torch)."""

    job_module: str | None = None

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        if self.job_module is not None:
            name, self.job_module = self.job_module, None
            try:
                module = importlib.import_module(name)
            except ImportError as exc:
                self.error(f"this job is not available here: {exc}")
            module.add_flags(self)
        return super().parse_known_args(args, namespace)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run", help="run a job on real ranks (torchrun, local CPU ranks, or Ray actors)",
        description="Run a tokenloom job on real ranks and report. Under torchrun each process "
        "is one rank (NCCL on GPUs, gloo on CPU): 'torchrun --nproc-per-node 2 -m tokenloom run "
        "attention --check'. Without torchrun, --launcher local forks --world-size CPU ranks and "
        "--launcher ray starts --world-size rank actors. A rank that dies or stops makes every "
        "other rank fail within --timeout, naming it. Ctrl-C (SIGINT) or SIGTERM stops every rank "
        "(exit 130 for Ctrl-C). Started with SIGINT ignored (nohup, a background job of a script), "
        "Ctrl-C stays ignored, as in Python and other Unix tools: stop it with SIGTERM.")
    add_launch_flags(p)
    jobs = p.add_subparsers(dest="job", metavar="JOB", parser_class=_JobParser)
    jobs.required = True
    for name, (module, help_text) in JOBS.items():
        if not _available(module):
            continue
        j = jobs.add_parser(name, help=help_text, description=_DESCRIPTIONS.get(name, help_text),
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        j.job_module = module
        j.set_defaults(func=_run)
        add_launch_flags(j, defaults=False)
