"""kohya's sample-prompt files: one prompt per line, `#` comments, per-prompt options after ` --` (--n negative
prompt, --w / --h size, --s steps, --l CFG scale, --d seed). lorafuse samples every prompt with the run's
resolution and sample_steps, so the options are reported as dropped."""

from __future__ import annotations

import re
from pathlib import Path

from lorafuse.errors import ConfigError

_OPTION = re.compile(r"\s--(\w+)")


def read_prompt_file(path: str | Path) -> tuple[list[str], list[str]]:
    """(prompts, dropped options such as '--n') of a kohya .txt prompt file."""
    path = Path(path)
    if path.suffix.lower() in (".toml", ".json"):
        raise ConfigError(f"{path}: only .txt prompt files are read (one prompt per line)")
    if not path.is_file():
        raise ConfigError(f"{path}: sample prompt file not found")
    prompts, dropped = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = _OPTION.search(" " + line)
        prompt = line if m is None else (" " + line)[: m.start()].strip()
        dropped += [f"--{o}" for o in _OPTION.findall(" " + line) if f"--{o}" not in dropped]
        if prompt:
            prompts.append(prompt)
    return prompts, dropped
