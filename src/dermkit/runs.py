"""Run folders: every stage run writes one self-describing folder.

``config.yaml`` (fully resolved), ``run.json`` (dermkit version, git commit, machine, start
and wall time), ``metrics.json``, weights as ``*.safetensors``, logs, plots, ``report.html``.
Loading a run needs only its folder.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path

from pydantic import BaseModel

from dermkit import __version__
from dermkit.config import save_config


def git_commit() -> str | None:
    """The repository's HEAD commit (with '-dirty' when files changed), or None outside git."""
    root = Path(__file__).resolve().parents[2]

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=5, check=True
        )
        return done.stdout.strip()

    try:
        sha = git("rev-parse", "--short=12", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info() -> dict:
    """Cores, CPU model and platform: every benchmark figure carries them."""
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


class RunDir:
    """A stage's output folder. Use as a context manager to record wall time in run.json."""

    def __init__(self, path: str | Path, config: BaseModel, stage: str, write: bool = True):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.stage = stage
        self.write = write  # False on data-parallel ranks other than 0
        if write:
            save_config(config, self.path / "config.yaml")
        self._start = time.time()
        self.info = {
            "stage": stage,
            "dermkit": __version__,
            "git_commit": git_commit(),
            "machine": machine_info(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        self._write_info()

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def _write_info(self) -> None:
        if self.write:
            (self.path / "run.json").write_text(json.dumps(self.info, indent=2))

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.info["wall_time_s"] = round(time.time() - self._start, 2)
        self.info["status"] = "failed" if exc_type else "finished"
        self._write_info()
