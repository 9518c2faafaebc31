"""unit: the small library behind train.py / evaluate.py (UNIT T1w <-> T2w translation)."""
