"""Evaluation: reconstruction metrics, entropy correlations, analytic FLOPs, and the report.

Submodules are imported on demand (`from ccmega.evaluation import metrics`) so that light commands
never pay for sacrebleu, rouge-score, scipy or matplotlib.
"""
