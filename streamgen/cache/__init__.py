"""Cache: the fixed synthetic set, the first N samples of a run's plan, on local disk.

In the direction data flows: `layout` (size, shard files, fingerprint, manifest, the checks),
`build` (the stream's generators with a disk writer), `reader` (memory-mapped shards, epoch
orders), `status` (info, verify) and `export` (for people and other tools). Training from it is
`streamgen.train.cache_data`; the launcher's checks `streamgen.launch.cache_checks`; the command
line ``python -m streamgen.cache build|info|verify|export`` is `streamgen.launch.cache_cli`.
"""
