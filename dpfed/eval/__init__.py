"""Evaluation of generative methods: the numbers their papers report, and figures.

Modules (import the one you need; `figures` pulls in matplotlib):
  fid: Fréchet distance with a pluggable `FeatureExtractor` (stable trace-sqrt).
  domain_features: the default extractor, `fid_domain` (a CNN trained on the train split).
  inception: Inception-v3 pool3 features from a user-given weights file (`fid_inception`).
  classifier_fit: non-private classifier training with early stopping (a metric tool).
  downstream: train on synthetic, test on real (CNN, MLP, logistic regression).
  figures: per-class sample grids, real-vs-synthetic figure, training curves (PNG).
  evaluation: evaluate a generator / .npz / real data / DP-SGD workdir -> eval.json.
  tables: paper-table specs (flagfiles), quoted reference rows, the markdown table.
"""
