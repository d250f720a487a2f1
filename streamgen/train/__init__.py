"""Train: one trainer rank's Lightning pieces, fed by the stream or the cache.

`source` (the seam: `SourceDataModule` and `make_datamodule`), `stream_data` (batches from the
rank's queue), `cache_data` (epochs over the fixed cache), `augment` (single and multi-crop on
the device), `model` (the classifier and its heads), `callbacks` (TensorBoard and the terminal),
`compute` (the accounted cost and the budget), `checkpoint` (atomic writes, stop-and-save),
`dashboard` (the TensorBoard link). Imports `plan`, `generate`, `stream`, `cache`.
"""
