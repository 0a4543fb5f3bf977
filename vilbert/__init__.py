"""ViLBERT: two-stream vision-and-language BERT with co-attention, on the `vilbert_kernels` Triton kernels."""
