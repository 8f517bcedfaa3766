"""`lorafuse ui`: a web UI over the same commands as the CLI (dataset, train, LoRA tools, fuse, compare, jobs).

Where it sits: on top of `lorafuse.cli`. Every button builds a `lorafuse` command line and runs it, either in the
page's helper process (`common.run_cli` -> `helper`, `tasks`: commands that take seconds, with torch loaded
there, never in the page's own process) or as a queued job in a worker process (`jobs`, `worker`, `runner`); the
dataset folders it writes go through `lorafuse.train.dataset_folders`, the API of `lorafuse dataset`. So the page
can do nothing the CLI cannot, and shows the command it ran. `command.py` parses the options of `lorafuse ui` and
starts the app (`server`, `app`, one `tab_*` module per tab).
"""
