"""Evaluation: frozen features and the papers' protocols (k-NN, linear, attentive probing, fine-tuning)."""
