"""`lorafuse ui`: a web UI over the same API as the CLI (dataset, train, LoRA tools, fuse, compare, jobs)."""
