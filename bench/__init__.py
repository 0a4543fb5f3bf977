"""Benchmarks of the `vilbert_kernels` ops and the ViLBERT training step against PyTorch and the field's kernels.

Run from the repository root: `python -m bench {kernels,ops,model,all} [--quick] [--out DIR]` (see bench/README.md).
Every number comes from the card it ran on, with every baseline timed in the same process; on a machine without a GPU
the harness runs the CPU-capable providers at tiny shapes and reports every GPU-only provider as skipped.
"""
