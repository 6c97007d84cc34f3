"""vmload: VM-like workloads on a mounted volume, with stamps that prove no write is lost."""
