"""`s4v train CONFIG.yaml [key=value ...]` (also `python -m s4v.train`)."""
from __future__ import annotations

import json
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
        return 0 if argv else 2
    from s4v.config import ConfigError
    from s4v.experiment import load_experiment

    path, overrides = (None, argv) if "=" in argv[0] else (argv[0], argv[1:])
    try:
        cfg = load_experiment(path, overrides)
    except (ConfigError, FileNotFoundError) as err:
        print(f"s4v train: config error: {err}", file=sys.stderr)
        return 2
    from s4v.train.checkpoint import CheckpointError
    from s4v.train.loop import DataSkipError, NonFiniteLossError, train

    try:
        result = train(cfg, argv)
    except ConfigError as err:  # the preflight: nothing was started
        print(f"s4v train: {err}", file=sys.stderr)
        return 2
    except (CheckpointError, NonFiniteLossError, DataSkipError) as err:  # a stop with a reason, not a bug
        print(f"s4v train: stopped: {err}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) == 0:
        print("RESULT_JSON " + json.dumps(result, sort_keys=True), flush=True)
    return 0 if result["status"] in ("finished", "preempted") else 1


if __name__ == "__main__":
    sys.exit(main())
