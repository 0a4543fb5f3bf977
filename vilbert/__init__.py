"""ViLBERT: two-stream vision-and-language BERT with co-attention, on the `vilbert_kernels` Triton kernels.

    from vilbert import ViLBERTConfig, ViLBERTForPretraining
    model = ViLBERTForPretraining(ViLBERTConfig.preset("vilbert-base"), backend="triton")
    model.load_bert("bert-base-uncased/")           # text stream from Hugging Face BERT weights (returns a report)
    out = model(**batch)                            # out.loss, out.mlm_loss, out.region_loss, out.align_loss
"""
from .checkpoint import LoadReport
from .config import ViLBERTConfig
from .model import (PretrainingOutput, SingleStreamForPretraining, SingleStreamForReferring, SingleStreamForRetrieval,
                    SingleStreamForVQA, SingleStreamModel, TaskOutput, ViLBERTForPretraining, ViLBERTForReferring,
                    ViLBERTForRetrieval, ViLBERTForVQA, ViLBERTModel, ViLBERTOutput)

__all__ = ["ViLBERTConfig", "ViLBERTModel", "ViLBERTForPretraining", "ViLBERTForVQA", "ViLBERTForRetrieval",
           "ViLBERTForReferring", "SingleStreamModel", "SingleStreamForPretraining", "SingleStreamForVQA",
           "SingleStreamForRetrieval", "SingleStreamForReferring", "ViLBERTOutput", "PretrainingOutput", "TaskOutput",
           "LoadReport"]
