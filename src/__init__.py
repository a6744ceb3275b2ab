"""Atlas: retrieval-augmented few-shot learning (Contriever retriever + Fusion-in-Decoder T5 reader)."""
