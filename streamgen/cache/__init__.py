"""The fixed synthetic cache: the first N samples of a run's plan, on local disk.

Stages, in the direction data flows: `layout` (size, shard files, fingerprint, manifest, the
checks), `build` (the stream's generators with a disk writer), `reader` (memory-mapped shards,
epoch orders), `datamodule` (training from it), `status` (info, verify) and `export` (for people and other
tools); `checks` holds the launcher's checks for ``--source cache`` and ``__main__`` the CLI:
``python -m streamgen.cache build|info|verify|export --config ...``.
"""
