"""kohya's sample-prompt files: one prompt per line, `#` comments, per-prompt options after ` --` (--n negative
prompt, --w / --h size, --s steps, --l CFG scale, --d seed). The negative prompt is kept (as "PROMPT --n NEGATIVE",
which the sampler splits); lorafuse samples every prompt with the run's resolution, sample_steps and seeds, so the
other options are reported as dropped."""

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
        prompt, options = split_options(line)
        dropped += [f"--{o}" for o in options if o != "n" and f"--{o}" not in dropped]
        if prompt:
            prompts.append(f"{prompt} --n {options['n']}" if options.get("n") else prompt)
    return prompts, dropped


def split_options(line: str) -> tuple[str, dict[str, str]]:
    """'a cat --n blurry --w 512' -> ('a cat', {'n': 'blurry', 'w': '512'})."""
    parts = _OPTION.split(" " + line)
    return parts[0].strip(), {parts[i]: parts[i + 1].strip() for i in range(1, len(parts) - 1, 2)}


def split_negative(prompt: str) -> tuple[str, str]:
    """A sample prompt and its negative prompt ('' unless it ends with kohya's ' --n NEGATIVE')."""
    text, options = split_options(prompt)
    return (text, options.get("n", "")) if "n" in options else (prompt.strip(), "")
