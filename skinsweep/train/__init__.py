"""Training stage: one trial's config, backbones (timm / open_clip / tiny test variants), the classifier
head, the embedding cache for linear probes, and the training loop (``run_trial``)."""
