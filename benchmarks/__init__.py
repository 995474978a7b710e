"""Side-by-side benchmarks of polydistill (issue 7); run ``python benchmarks/run.py --quick``."""
