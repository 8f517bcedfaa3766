"""`lorafuse ui`: a web UI over the same commands as the CLI (dataset, train, LoRA tools, fuse, compare, jobs).

Where it sits: on top of `lorafuse.cli`. Every button builds a `lorafuse` command line and runs it, either here
(`common.run_cli`, for commands that take seconds) or as a queued job in a worker process (`jobs`, `worker`,
`runner`); so the page can do nothing the CLI cannot, and shows the command it ran. `cli/ui.py` only parses the
options of `lorafuse ui` and starts the app (`server`, `app`, one `tab_*` module per tab).
"""
