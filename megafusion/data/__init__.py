"""megafusion.data: dataset folders -> packed, blended, DP-sharded, resumable Batch micro-batches.

  batch.py           the Batch contract every layer reads
  special_tokens.py  reserved token ids (BOS/EOS/BOI/EOI/FRAME ...)
  collate.py         SequenceLayout rows -> Batch (the reference); patchify
  collate_packed.py  planned dataset rows (SegmentTable) -> Batch: the loader's hot path
  packed_kernels.py  its compiled loops (numba): every field and patch written in one pass
  frame_copies.py    BAGEL's clean copies: frames laid out once or twice (objective.captioning)
  synthetic.py       generated documents (default data, tests, benchmarks)
  indexed.py         open + validate a preprocessed folder (docs/DATA_FORMAT.md), read documents
  packing.py         document stream -> row plans (frames never split) -> SegmentTable / SequenceLayout
  plan_kernel.py     the compiled row planner (RowPlanner.add over many documents)
  sampler.py         train/valid split, per-epoch order, packed row streams, DP micro-batches, resume
  blending.py        weighted interleaving of datasets (megatron's blending index)
  loader.py          build_data_iterators(cfg, dp_rank, dp_size, consumed_samples) with background workers
  workers.py         background processes that plan and build batches into a shared-memory ring
  batch_ring.py      that ring: slots, leasing batches as views, freeing a slot when its batch is dropped

The package import stays light (no megatron import); `build_data_iterators` is loaded on first use.
"""


def __getattr__(name):
    if name in ("build_data_iterators", "DataIterator"):
        from megafusion.data import loader

        return getattr(loader, name)
    raise AttributeError(f"module 'megafusion.data' has no attribute {name!r}")
