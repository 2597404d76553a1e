"""`s4v train CONFIG.yaml [key=value ...]` (also `python -m s4v.train`)."""
from __future__ import annotations

import json
import logging
import os
import sys
from typing import Optional, Sequence

USAGE = "usage: s4v train CONFIG.yaml [key=value ...]   (e.g. train.epochs=5 model.num_frames=16)"


def main(argv: Optional[Sequence[str]] = None) -> int:
    from s4v.train.dist import buffer_preemption_signals

    buffer_preemption_signals()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        if argv:
            print(HELP + config_listing())
        return 0 if argv else 2
    from s4v.config import ConfigError
    from s4v.experiment import load_experiment

    path, overrides = (None, argv) if "=" in argv[0] else (argv[0], argv[1:])
    try:
        cfg = load_experiment(path, overrides)
    except (ConfigError, FileNotFoundError) as err:
        print(f"s4v train: config error: {err}", file=sys.stderr)
        return 2
    quiet_build_probes()
    quiet_library_deprecations()
    from s4v.eval.skips import EvalSkipError
    from s4v.model.weights_file import WeightsFileError
    from s4v.train.checkpoint import CheckpointError
    from s4v.train.loop import DataSkipError, NonFiniteLossError, train

    try:
        result = train(cfg, argv)
    except (ConfigError, WeightsFileError) as err:  # the preflight, or a weights file that cannot be used
        print(f"s4v train: {_without_prefix(err)}", file=sys.stderr)
        return 2
    except (CheckpointError, NonFiniteLossError, DataSkipError, EvalSkipError) as err:  # a stop with a reason
        print(f"s4v train: stopped: {_without_prefix(err)}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) == 0:
        print("RESULT_JSON " + json.dumps(result, sort_keys=True), flush=True)
    return 0 if result["status"] in ("finished", "preempted") else 1


HELP = """
Merge order: the defaults below <- CONFIG.yaml (recipes: ds_configs/experiments/) <- key=value overrides.
`s4v config CONFIG.yaml [key=value ...]` prints the resolved experiment. Exit codes: 0 finished or
preempted, 1 stopped with a reason (checkpoint write, non-finite losses, unreadable data), 2 bad config,
data or weights file.

Keys (default, meaning):
"""


def config_listing() -> str:
    from s4v.cli.config_help import describe_config
    from s4v.experiment import ExperimentConfig

    return describe_config(ExperimentConfig())


def _without_prefix(err: BaseException) -> str:
    """The message once, whatever layer already put the command's name in front of it."""
    return str(err).removeprefix("s4v train: ")


def quiet_library_deprecations() -> None:
    """FutureWarnings printed by every rank at every start about calls whose replacements are not
    equivalent yet: torch.distributed.nn's autograd all_reduce/all_gather (s4v's synced BatchNorm and
    retrieval gathers need their backward) and DeepSpeed's own all_gather_into_tensor."""
    import warnings

    for message in (r"torch\.distributed\.nn\.functional\.all_(reduce|gather) is deprecated",
                    r"`torch\.distributed\.all_gather_into_tensor` is deprecated"):
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)


def quiet_build_probes() -> None:
    """DeepSpeed's import and op builders probe for compilers and CUDA (a test compile for libaio, "No
    CUDA runtime is found, using CUDA_HOME=..."), logged at INFO/WARNING on every start: keep them out of
    the run's log unless they fail."""
    for name in ("compilers", "distutils", "setuptools", "torch.utils.cpp_extension"):
        logging.getLogger(name).setLevel(logging.ERROR)


if __name__ == "__main__":
    sys.exit(main())
