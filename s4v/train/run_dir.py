"""Self-describing run directories: resolved config, DeepSpeed JSON, git revision, versions, command."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from s4v.config import config_to_dict, dump_config
from s4v.fileio import atomic_write_bytes

log = logging.getLogger(__name__)
PACKAGES = ("s4v", "torch", "torchvision", "deepspeed", "open_clip_torch", "timm", "nvidia-dali-cuda130",
            "nvidia-dali-cuda120", "av", "numpy")


def default_run_name(model_name: str) -> str:
    """Stable across a Slurm requeue (same job id), so the requeued job finds its checkpoints."""
    job = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
    if job:
        task = os.environ.get("SLURM_ARRAY_TASK_ID")
        return f"{model_name}-job{job}" + (f"_{task}" if task and os.environ.get("SLURM_ARRAY_JOB_ID") else "")
    return f"{model_name}-{time.strftime('%Y%m%d-%H%M%S')}"


def git_state(repo: Path) -> str:
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                                  timeout=20).stdout
        except (OSError, subprocess.SubprocessError):
            return ""
    rev = git("rev-parse", "HEAD").strip() or "unknown (not a git checkout)"
    status = git("status", "--porcelain")
    diff = git("diff", "HEAD") if status else ""
    return f"revision: {rev}\ndirty: {bool(status.strip())}\n{status}\n{diff}"


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for pkg in PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def write_run_description(run_dir: Path, cfg: Any, ds_config: dict, argv: list[str], batch: Any = None) -> None:
    """Called on rank 0. A resume into the same folder keeps every run's config (`keep_config`); the
    other files are rewritten (the first run's command is kept as `command.txt.first`)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if (run_dir / "command.txt").is_file() and not (run_dir / "command.txt.first").exists():
        shutil.copy2(run_dir / "command.txt", run_dir / "command.txt.first")
    keep_config(run_dir, with_absolute_paths(cfg, Path.cwd()))
    atomic_write_bytes(run_dir / "ds_config.json", json.dumps(ds_config, indent=2).encode())
    if batch is not None:  # the derived global batch and accumulation (s4v.train.batching.BatchPlan)
        numbers = {**dataclasses.asdict(batch), "global_batch": batch.global_batch}
        atomic_write_bytes(run_dir / "batch.json", json.dumps(numbers, indent=2).encode())
    atomic_write_bytes(run_dir / "git.txt", git_state(Path(__file__).resolve().parents[2]).encode())
    atomic_write_bytes(run_dir / "versions.json", json.dumps(versions(), indent=2).encode())
    slurm = {k: v for k, v in os.environ.items() if k.startswith("SLURM_")}
    command = " ".join([sys.executable, "-m", "s4v.train", *argv])
    atomic_write_bytes(run_dir / "command.txt",
                       (f"{command}\n{CWD_LINE}{Path.cwd()}\n\n"
                        + "\n".join(f"{k}={v}" for k, v in sorted(slurm.items()))).encode())
    script = os.environ.get("S4V_SBATCH_SCRIPT")
    if script and Path(script).is_file():
        shutil.copy2(script, run_dir / "sbatch_script.sh")


def _resume_numbers(run_dir: Path) -> list[int]:
    return sorted(int(p.stem.rsplit("-", 1)[1]) for p in Path(run_dir).glob("config.resume-*.yaml")
                  if p.stem.rsplit("-", 1)[1].isdigit())


def latest_config(run_dir: Path) -> Path:
    """The config of the run's latest launch: `config.resume-K.yaml` for the highest K, else `config.yaml`
    (a resume may have moved the data or changed the test protocol)."""
    resumes = _resume_numbers(run_dir)
    return Path(run_dir) / (f"config.resume-{resumes[-1]}.yaml" if resumes else "config.yaml")


def keep_config(run_dir: Path, cfg: Any) -> Path:
    """Write `config.yaml`, or on a resume (it exists) `config.resume-K.yaml` (K = 1, 2, ...), logging
    how the config differs from the previous run's. Returns the file written."""
    resumes = _resume_numbers(run_dir)
    if not resumes and not (run_dir / "config.yaml").is_file():
        return dump_config(cfg, run_dir / "config.yaml")
    previous = latest_config(run_dir)
    path = run_dir / f"config.resume-{(resumes[-1] if resumes else 0) + 1}.yaml"
    for line in config_differences(yaml.safe_load(previous.read_text()) or {}, config_to_dict(cfg)):
        log.warning("config changed on resume (%s -> %s): %s", previous.name, path.name, line)
    return dump_config(cfg, path)


def config_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """`key: old -> new` for every dotted key whose value differs (added and removed keys included)."""
    out = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


# ------------------------------------------------------------------- paths that must work from anywhere
PATH_KEYS = (("data", "root"), ("model", "pretrained"))  # files a run's config.yaml names
CWD_LINE = "cwd: "  # the launch directory's line in command.txt


def with_absolute_paths(cfg: Any, base: Path, skip: tuple[str, ...] = ()) -> Any:
    """A copy of `cfg` with relative `data.root` / `model.pretrained` made absolute against `base`
    (the keys in `skip`, e.g. given on the command line, are left as they are)."""
    for section, name in PATH_KEYS:
        value = getattr(getattr(cfg, section), name)
        if not value or f"{section}.{name}" in skip or Path(value).is_absolute():
            continue
        if name == "pretrained" and not looks_like_a_path(value, base):  # a tag or hf-hub: name
            continue
        fixed = dataclasses.replace(getattr(cfg, section), **{name: os.path.abspath(Path(base) / value)})
        cfg = dataclasses.replace(cfg, **{section: fixed})
    return cfg


def looks_like_a_path(value: str, base: Path) -> bool:
    """`model.pretrained` is a file path (relative to `base`), not an open_clip/timm tag or `hf-hub:` name."""
    return (not value.startswith("hf-hub:") and
            ("/" in value or (Path(base) / value).exists() or value.endswith((".pt", ".pth", ".bin", ".safetensors"))))


def launch_dir(run_dir: Path) -> Path | None:
    """Where the run was started: the `cwd:` line of its command.txt, or Slurm's submit directory in
    older runs (which recorded no cwd); None if neither is there."""
    path = Path(run_dir) / "command.txt"
    lines = path.read_text(errors="replace").splitlines() if path.is_file() else []
    for prefix in (CWD_LINE, "SLURM_SUBMIT_DIR="):
        for line in lines:
            if line.startswith(prefix) and line[len(prefix):].strip():
                return Path(line[len(prefix):].strip())
    return None
